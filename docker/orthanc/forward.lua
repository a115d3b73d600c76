-- Orthanc -> dicom-ai auto-forwarding (loaded through "LuaScripts" in orthanc.json).
--
-- When a series has received no new instance for "StableAge" seconds, Orthanc calls
-- OnStableSeries(seriesId, tags, metadata): `tags` are the series' main DICOM tags (Modality
-- among them), `metadata` the series' metadata (RemoteAET: the calling AE title of the
-- C-STORE that brought it; empty for uploads through the REST API or DICOMweb).
--
-- Every stable series is sent to the node, except what must never go back to it:
--   * its own results (Modality SEG or SR), and
--   * anything the node itself stored here (RemoteAET = the node's AE title),
-- otherwise each result would be forwarded to the node, and again, forever.

-- The node's entry in orthanc.json "DicomModalities": its AE title, host and port live there
-- only; this name is the one place the script refers to it.
NODE_MODALITY = 'dicom-ai'

-- Modalities of the objects the node sends back.
local RESULT_MODALITIES = { SEG = true, SR = true }

local function Log(message)
   print('dicom-ai forward: ' .. message)
end

-- The node's AE title, read from the DicomModalities entry (array or object form).
local function NodeAet()
   local modalities = GetOrthancConfiguration()['DicomModalities'] or {}
   local entry = modalities[NODE_MODALITY]
   if entry == nil then
      error('no DicomModalities entry "' .. NODE_MODALITY .. '" in the Orthanc configuration')
   end
   return entry['AET'] or entry[1]
end

function OnStableSeries(seriesId, tags, metadata)
   local modality = tags['Modality'] or ''
   local sender = metadata['RemoteAET'] or ''
   local what = 'series ' .. seriesId .. ' (' .. modality .. ', from "' .. sender .. '")'

   if RESULT_MODALITIES[modality] then
      Log(what .. ': not forwarded, Modality ' .. modality .. ' is a result')
      return
   end
   if sender == NodeAet() then
      Log(what .. ': not forwarded, stored by the node itself')
      return
   end

   local series = RestApiGet('/series/' .. seriesId)
   if series == nil then
      Log(what .. ': not forwarded, it is gone')
      return
   end
   -- SendToModality takes instance ids: Orthanc 1.10 fails a job given a series id
   -- ("Unable to read attachment dicom of instance <series id>"). The instances of one
   -- event go out in one Lua job, over one association.
   local instances = ParseJson(series)['Instances']
   for _, instanceId in ipairs(instances) do
      SendToModality(instanceId, NODE_MODALITY)
   end
   Log(what .. ': forwarding ' .. #instances .. ' instance(s) to ' .. NODE_MODALITY)
end
