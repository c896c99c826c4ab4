-- The status rules of src/rules.rs, run atomically in Redis for one user: cluster mode decides
-- every change here, once, for every node. Mirror of `rules::apply`, function for function;
-- tests/rules_conformance.rs runs the same operation sequences through both and compares.
--
-- KEYS[1]: the user's hash. Fields: c (chosen status), ls (last_seen), lo (last offline), v
-- (version), ov (offline version), po/pl (online/last_seen visibility), pa (approximate
-- last_seen 1/0), ct/ce/cx (custom text, emoji, expiry), is (inactive since), g (grace
-- "token,since,node,devices" or ""), and d:NODE = "seq,devices" per node that reported devices.
-- Devices are "total,active,unspecified,desktop,mobile,web". Empty strings are unset values.
--
-- ARGV: 1 op, 2 node, 3 now, 4 user id, 5 publish command ('PUBLISH', 'SPUBLISH' or ''),
-- 6 channel, 7 idle TTL in ms (the hash expires this long after its user's last device left),
-- 8..19 the seed (c ls lo v ov po pl pa ct ce cx is: what the calling node knows, used when
-- Redis has nothing for the user), 20..22 the op's arguments, 23 the calling node's own report
-- "seq,devices" as it knows it (or ''), also used only when Redis has nothing for the user,
-- 24 the seed's choice time (field ca: when the user last chose a status, privacy or custom
-- status; after a partition the later choice wins).
local h = KEYS[1]
local op, node, now, uid = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local pubcmd, chan, idle_ttl = ARGV[5], ARGV[6], tonumber(ARGV[7])
local a1, a2, a3 = ARGV[20], ARGV[21], ARGV[22]
local SCALARS = {'c', 'ls', 'lo', 'v', 'ov', 'po', 'pl', 'pa', 'ct', 'ce', 'cx', 'is'}

local created = false
if redis.call('EXISTS', h) == 0 then
  -- A dead node's devices, or a grace, cannot be in a state Redis does not have: nothing to do
  -- (and no state to create from a seed the caller may not even have).
  if op == 'drop_node' or op == 'expire' then return {'000', ''} end
  local args = {'g', ''}
  for i, f in ipairs(SCALARS) do
    args[#args + 1] = f
    args[#args + 1] = ARGV[7 + i]
  end
  if ARGV[23] ~= nil and ARGV[23] ~= '' then
    args[#args + 1] = 'd:' .. node
    args[#args + 1] = ARGV[23]
  end
  args[#args + 1] = 'ca'
  args[#args + 1] = ARGV[24] or '0'
  redis.call('HSET', h, unpack(args))
  created = true
end

local s, nodes = {}, {}
local raw = redis.call('HGETALL', h)
for i = 1, #raw, 2 do
  local k, val = raw[i], raw[i + 1]
  if string.sub(k, 1, 2) == 'd:' then nodes[string.sub(k, 3)] = val else s[k] = val end
end
-- A hash written by an older version of this script may lack fields: their defaults.
local DEFAULTS = {c = 'online', ls = '', lo = '', v = '0', ov = '0', po = 'contacts',
  pl = 'contacts', pa = '1', ct = '', ce = '', cx = '', ['is'] = '', g = '', ca = '0'}
for f, default in pairs(DEFAULTS) do
  if s[f] == nil then s[f] = default end
end

local function num(x) if x == nil or x == '' then return nil end return tonumber(x) end
local function fmt(x) if x == nil then return '' end return string.format('%.0f', x) end

-- "total,active,p0,p1,p2,p3" -> {t, a, p0, p1, p2, p3}
local function devs(str)
  local d = {}
  for f in string.gmatch(str, '[^,]+') do d[#d + 1] = tonumber(f) end
  return d
end
local function devs_str(d) return table.concat({d[1], d[2], d[3], d[4], d[5], d[6]}, ',') end
local ZERO = {0, 0, 0, 0, 0, 0}

-- d:NODE value "seq,devices" -> seq, devices
local function report_of(val)
  local comma = string.find(val, ',', 1, true)
  return tonumber(string.sub(val, 1, comma - 1)), devs(string.sub(val, comma + 1))
end

local function live()
  local sum = {0, 0, 0, 0, 0, 0}
  for _, val in pairs(nodes) do
    local _, d = report_of(val)
    for i = 1, 6 do sum[i] = sum[i] + d[i] end
  end
  return sum
end

-- The grace: token, since, node, frozen devices; nil when none.
local function grace()
  if s.g == nil or s.g == '' then return nil end
  local f = {}
  for x in string.gmatch(s.g, '[^,]+') do f[#f + 1] = x end
  return {token = f[1], since = tonumber(f[2]), node = f[3],
          frozen = {tonumber(f[4]), tonumber(f[5]), tonumber(f[6]), tonumber(f[7]), tonumber(f[8]), tonumber(f[9])}}
end

local function shown()
  local l = live()
  if l[1] > 0 then return l end
  local g = grace()
  if g then return g.frozen end
  return nil
end

local function effective()
  local d = shown()
  if d == nil then return 'offline' end
  if s.c == 'online' and d[2] == 0 then return 'away' end
  return s.c
end

local function auto_away()
  local d = shown()
  return s.c == 'online' and d ~= nil and d[2] == 0
end

-- Known platforms as a bit set: desktop 2, mobile 4, web 8.
local function platforms()
  local d = shown()
  if d == nil or effective() == 'offline' then return 0 end
  local bits = 0
  if d[4] > 0 then bits = bits + 2 end
  if d[5] > 0 then bits = bits + 4 end
  if d[6] > 0 then bits = bits + 8 end
  return bits
end

local function idle_since()
  if auto_away() then return s['is'] or '' end
  return ''
end

-- What viewers can see, as one comparable string (rules::Presence::facets_key).
local function facets()
  return table.concat({effective(), s.ls, s.po, s.pl, s.pa, tostring(platforms()), idle_since(),
    s.ct, s.ce, s.cx}, '\0')
end

-- Sets `n`'s report unless `seq` is not newer than the one kept.
local function report(n, seq, d)
  local old = nodes[n]
  if old ~= nil then
    local old_seq = report_of(old)
    if old_seq >= seq then return false end
  end
  nodes[n] = fmt(seq) .. ',' .. devs_str(d)
  redis.call('HSET', h, 'd:' .. n, nodes[n])
  return true
end

local before = facets()
local was_visible = effective() ~= 'offline'
local at = now
local publish = false
local stale = false

if op == 'devices' then
  local was_live = live()[1] > 0
  local was_shown = shown()
  if not report(node, tonumber(a1), devs(a2)) then
    stale = true
  elseif live()[1] > 0 then
    s.g = ''
  elseif was_live and a3 ~= '' and s.g == '' and was_shown ~= nil then
    s.g = table.concat({a3, fmt(now), node, devs_str(was_shown)}, ',')
  end
elseif op == 'expire' then
  local g = grace()
  if g and g.token == a1 and g.node == node then
    at = g.since
    s.g = ''
  end
elseif op == 'status' then
  s.c = a1
  if now > tonumber(s.ca) then s.ca = fmt(now) end
elseif op == 'privacy' then
  s.po, s.pl, s.pa = a1, a2, a3
  if now > tonumber(s.ca) then s.ca = fmt(now) end
elseif op == 'custom' then
  s.ct, s.ce, s.cx = a1, a2, a3
  if now > tonumber(s.ca) then s.ca = fmt(now) end
elseif op == 'expire_custom' then
  if (s.ct ~= '' or s.ce ~= '') and s.cx == a1 then s.ct, s.ce, s.cx = '', '', '' end
elseif op == 'drop_node' then
  nodes[a1] = nil
  redis.call('HDEL', h, 'd:' .. a1)
  at = tonumber(a2)
  local g = grace()
  if g and g.node == a1 then
    if g.since < at then at = g.since end
    s.g = ''
  end
elseif op == 'reconcile' then
  -- a1: the node's own report "seq,devices" or ''; a2: the facets of the node's copy.
  if a1 ~= '' then
    local seq, d = report_of(a1)
    report(node, seq, d)
  end
  local seed_v = tonumber(ARGV[11])
  local seed_ca = tonumber(ARGV[24] or '0')
  local ca = tonumber(s.ca)
  -- The later choice wins; with no time on either side (older states), the higher version.
  if seed_ca > ca or (seed_ca == ca and seed_v > tonumber(s.v)) then
    s.c, s.po, s.pl, s.pa, s.ct, s.ce, s.cx = ARGV[8], ARGV[13], ARGV[14], ARGV[15], ARGV[16], ARGV[17], ARGV[18]
    s.ca = fmt(seed_ca)
  end
  local function later(x, y)
    local nx, ny = num(x), num(y)
    if nx == nil then return y end
    if ny == nil then return x end
    if nx >= ny then return x end
    return y
  end
  s.ls = later(s.ls, ARGV[9])
  s.lo = later(s.lo, ARGV[10])
  if tonumber(ARGV[12]) > tonumber(s.ov) then s.ov = ARGV[12] end
  local differs_from_seed = facets() ~= a2
  if seed_v > tonumber(s.v) then s.v = ARGV[11] end
  if differs_from_seed then s.v = fmt(tonumber(s.v) + 1) end
  publish = true
end

-- inactive since: when the shown devices last stopped having an active one.
local d = shown()
if d ~= nil and d[2] == 0 then
  if s['is'] == '' then s['is'] = fmt(at) end
else
  s['is'] = ''
end

local changed = (not stale) and (facets() ~= before or op == 'touch')
if changed then
  s.v = fmt(tonumber(s.v) + 1)
  local is_visible = effective() ~= 'offline'
  if was_visible ~= is_visible then
    local ls = num(s.ls)
    if ls == nil or ls < at then s.ls = fmt(at) end
    if not is_visible then
      s.lo = s.ls
      s.ov = fmt(tonumber(s.ov) + 1)
    end
  end
end
publish = publish or changed

local args = {}
for _, f in ipairs(SCALARS) do
  args[#args + 1] = f
  args[#args + 1] = s[f]
end
args[#args + 1] = 'g'
args[#args + 1] = s.g
args[#args + 1] = 'ca'
args[#args + 1] = s.ca
redis.call('HSET', h, unpack(args))
-- The hash lives while a device (or a grace) does; afterwards the store has it (the node that
-- made the last change writes it and releases the hash), and this TTL is the safety net.
if live()[1] == 0 and s.g == '' then
  redis.call('PEXPIRE', h, idle_ttl)
else
  redis.call('PERSIST', h)
end

local state = {k = 'p', u = uid, g = s.g, ca = s.ca, d = {}}
for _, f in ipairs(SCALARS) do state[f] = s[f] end
for n, val in pairs(nodes) do state.d[n] = val end
local msg = cjson.encode(state)
if publish and pubcmd ~= '' then redis.call(pubcmd, chan, msg) end
local flags = '0'
if changed then flags = '1' end
if publish then flags = flags .. '1' else flags = flags .. '0' end
if created then flags = flags .. '1' else flags = flags .. '0' end
return {flags, msg}
