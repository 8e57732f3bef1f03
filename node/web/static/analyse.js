// The "Analyse a file" pages and the study page's progress block (served from /static: the
// Content-Security-Policy allows no inline script).
'use strict';

{  // a block: nothing here becomes a global of the page
  function addStep(list, data) {
    const li = document.createElement('li');
    li.className = 'step step-' + data.stage;
    const b = document.createElement('b');
    b.textContent = data.stage;
    li.append(b, ' ');
    if (data.at !== undefined) {
      const at = document.createElement('span');
      at.className = 'at';
      at.textContent = data.at.toFixed(2) + ' s';
      li.append(at, ' ');
    }
    li.append(data.message || '');
    list.append(li);
  }

  // the upload form: refuse a file over the limit before sending it
  const form = document.querySelector('form.analyse');
  if (form) {
    const max = Number(form.dataset.maxBytes);
    const note = document.getElementById('client-refusal');
    form.addEventListener('submit', (ev) => {
      const file = document.getElementById('file').files[0];
      if (file && max && file.size > max) {
        ev.preventDefault();
        note.hidden = false;
        note.textContent = `the file is ${(file.size / 1e6).toFixed(1)} MB; the limit is ${(max / 2 ** 20).toFixed(0)} MB (web.max_upload_mb)`;
        return;
      }
      document.getElementById('analyse').disabled = true;
      document.getElementById('analyse').textContent = 'Uploading…';
    });
  }

  // an analysis running: follow its steps, then show the result page
  const progress = document.getElementById('analysis-progress');
  if (progress) {
    const list = document.getElementById('steps');
    list.textContent = '';  // the stream replays every step from the first
    const source = new EventSource(progress.dataset.events);
    const stages = ['received', 'decoded', 'routed', 'preprocessing', 'inference', 'heatmap', 'done', 'failed'];
    for (const stage of stages) {
      source.addEventListener(stage, (ev) => {
        addStep(list, JSON.parse(ev.data));
        if (stage === 'done' || stage === 'failed') {
          source.close();
          document.getElementById('live').textContent = stage === 'done' ? 'Done: opening the result…' : 'Failed.';
          window.location.replace(progress.dataset.result);
        }
      });
    }
    source.onerror = () => { document.getElementById('live').textContent = 'The progress stream was interrupted; retrying…'; };
  }

  // the result page's print button
  const print = document.getElementById('print');
  if (print) print.addEventListener('click', () => window.print());

  // the study page: job states while any job is queued or running
  const jobs = document.getElementById('job-progress');
  if (jobs && !jobs.hidden) {
    const list = jobs.querySelector('ol');
    const source = new EventSource(jobs.dataset.events);
    let changes = 0;
    source.addEventListener('job', (ev) => {
      const job = JSON.parse(ev.data);
      changes += 1;
      addStep(list, { stage: `job ${job.id} ${job.model}`, message: job.state + (job.error ? ': ' + job.error : '') });
    });
    source.addEventListener('idle', () => {
      source.close();
      jobs.querySelector('.note').textContent = 'Every job has finished.';
      if (changes > 0) window.location.reload();
    });
  }
}
