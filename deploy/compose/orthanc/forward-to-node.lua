-- Forward every instance Orthanc receives to the inference node, except the node's own results
-- (they come back from the calling AE PACSNODE and would otherwise loop).
function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin["RequestOrigin"] == "DicomProtocol" and origin["RemoteAet"] == "PACSNODE" then
    return
  end
  SendToModality(instanceId, "pacsnode")
end
