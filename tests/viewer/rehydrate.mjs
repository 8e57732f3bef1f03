// Load a node SR with dcmjs and rehydrate it with @cornerstonejs/adapters (what OHIF 3.13 does),
// printing JSON: {measurements: [{toolType, description, label, frameNumber, polyline, points}]}.
// Usage: node rehydrate.mjs SR.dcm SOURCES.json  (SOURCES: [{"uid": ..., "frames": N}])
import fs from 'node:fs';
import dcmjs from 'dcmjs';
import { metaData } from '@cornerstonejs/core';
import { adaptersSR } from '@cornerstonejs/adapters';

const [srPath, sourcesPath] = process.argv.slice(2);
const sources = JSON.parse(fs.readFileSync(sourcesPath, 'utf8'));
const map = {};
for (const { uid, frames } of sources) {
  for (let f = 1; f <= Math.max(frames, 1); f++) map[`${uid}:${f}`] = `node:${uid}:${f}`;
}
// identity geometry: world = (column - 0.5, row - 0.5, 0)
const plane = { frameOfReferenceUID: '1.2.3', rowCosines: [1, 0, 0], columnCosines: [0, 1, 0],
  imagePositionPatient: [0, 0, 0], rowPixelSpacing: 1, columnPixelSpacing: 1 };
const provider = (type, imageId) => (type === 'imagePlaneModule' && String(imageId).startsWith('node:') ? plane : undefined);
metaData.addProvider(provider, 10000);
const metadata = { get: provider };

const log = console.log;
console.log = () => {};  // the adapters print every measurement
const warnings = [];
console.warn = (...args) => warnings.push(args.map(String).join(' ').slice(0, 300));
const buffer = fs.readFileSync(srPath);
const dicom = dcmjs.data.DicomMessage.readFile(buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.byteLength));
const dataset = dcmjs.data.DicomMetaDictionary.naturalizeDataset(dicom.dict);
const state = adaptersSR.Cornerstone3D.MeasurementReport.generateToolState(dataset, map, metadata, {});
const measurements = [];
for (const [toolType, items] of Object.entries(state)) {
  for (const m of items) {
    const data = m.annotation?.data ?? {};
    measurements.push({ toolType, description: m.description, label: data.label ?? null,
      frameNumber: data.frameNumber ?? null, referencedImageId: m.annotation?.metadata?.referencedImageId ?? null,
      polyline: data.contour?.polyline ?? null, points: data.handles?.points ?? null });
  }
}
log(JSON.stringify({ measurements, warnings }));
