-- Argo CD health of a loraplane.io LoraAdapter, read from the conditions the operator writes
-- (docs/operator.md, docs/gitops.md). Argo CD has no progress deadline for custom resources,
-- so a state that waits for a person (a refused adapter, a source that fails, a missing base,
-- a taken served name) is Degraded at once rather than Progressing forever.
local hs = {}

local function condition(conditions, kind)
  for _, c in ipairs(conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local status = obj.status
if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to report"
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local stalled = condition(status.conditions, "Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = (stalled.reason or "Stalled") .. ": " .. (stalled.message or "")
  return hs
end

local ready = condition(status.conditions, "Ready")
if ready == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to report"
  return hs
end
if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or ""
  return hs
end

local needsAction = {
  Incompatible = true,
  LoadFailed = true,
  SecretNotFound = true,
  BaseModelNotFound = true,
  ServedNameConflict = true,
}
if needsAction[ready.reason] then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
end
hs.message = (ready.reason or "NotReady") .. ": " .. (ready.message or "")
return hs
