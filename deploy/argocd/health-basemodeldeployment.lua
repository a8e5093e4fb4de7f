-- Argo CD health of a loraplane.io BaseModelDeployment, read from the conditions the operator
-- writes (docs/operator.md, docs/gitops.md). Adapters that fail make their own LoraAdapters
-- Degraded; the deployment stays Healthy while it serves and says so in its message.
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
if ready.status ~= "True" then
  hs.status = "Progressing"
  hs.message = (ready.reason or "NotReady") .. ": " .. (ready.message or "")
  return hs
end

-- Zero replicas: asked for by spec.replicas (Suspended), or the autoscaler's idle scale to
-- zero, which wakes on the next request (Healthy).
local autoscaled = obj.spec ~= nil and obj.spec.autoscaling ~= nil and obj.spec.autoscaling.enabled == true
if ready.reason == "ScaledToZero" and not autoscaled then
  hs.status = "Suspended"
  hs.message = "scaled to zero by spec.replicas"
  return hs
end
hs.status = "Healthy"
hs.message = ready.message or ""
local degraded = condition(status.conditions, "Degraded")
if degraded ~= nil and degraded.status == "True" then
  hs.message = hs.message .. "; " .. (degraded.message or "")
end
return hs
