//! Lua scripts: each runs atomically inside Redis, which is what makes a lease exclusive and a
//! submit all-or-nothing. All use Redis's own clock (`TIME`). Keys are built from the prefix
//! passed as ARGV[1] (single-node Redis; not cluster-safe by design).
//!
//! Every script returns a table whose first element is a status word:
//! `ok`, `dup` (idempotent repeat), `empty`, or an error word
//! (`not_found`, `not_owner`, `expired`, `submitted`, `skipped`).

/// Shared prelude: `now_ms()` and `reclaim(prefix, now)`, which returns every expired lease
/// to the queue at its last priority and marks the lease `expired`.
const PRELUDE: &str = r#"
-- With overlap, a lease looks this far down the queue for an image the expert was never leased.
local OVERLAP_SCAN = 256
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Appends an audit record (`P:audit`, never trimmed): kind, who, time and field pairs.
local function audit(p, kind, who, fields)
  local args = {p .. ':audit', '*', 'kind', kind, 'who', who, 'time_ms', tostring(now_ms())}
  for i = 1, #fields, 2 do
    local v = fields[i + 1]
    if v ~= nil and v ~= false and v ~= cjson.null then
      table.insert(args, fields[i])
      table.insert(args, tostring(v))
    end
  end
  redis.call('XADD', unpack(args))
end
local function reclaim(p, now)
  local expired = redis.call('ZRANGEBYSCORE', p .. ':leases', '-inf', now)
  for _, img in ipairs(expired) do
    local lid = redis.call('HGET', p .. ':image_lease', img)
    redis.call('ZREM', p .. ':leases', img)
    redis.call('HDEL', p .. ':image_lease', img)
    if lid then
      local seq = redis.call('INCR', p .. ':seq')
      redis.call('HSET', p .. ':lease:' .. lid, 'state', 'expired', 'release_seq', seq)
      redis.call('EXPIRE', p .. ':lease:' .. lid, 86400)
    end
    local prio = redis.call('HGET', p .. ':prio', img) or '0'
    redis.call('ZADD', p .. ':queue', prio, img)
  end
  return #expired
end
-- Checks that lease `lid` is active, owned by `expert` and not past its deadline.
-- Returns (lease table, nil) or (nil, error word).
local function active_lease(p, lid, expert, now)
  local key = p .. ':lease:' .. lid
  local h = redis.call('HGETALL', key)
  if #h == 0 then return nil, 'not_found' end
  local l = {}
  for i = 1, #h, 2 do l[h[i]] = h[i + 1] end
  if l['expert'] ~= expert then return nil, 'not_owner' end
  if l['state'] ~= 'active' then return nil, l['state'] end
  if tonumber(l['deadline']) <= now then
    reclaim(p, now)
    return nil, 'expired'
  end
  l['key'] = key
  l['id'] = lid
  return l, nil
end
local function release(p, l, state)
  redis.call('ZREM', p .. ':held:' .. l['expert'], l['id'])
  redis.call('ZREM', p .. ':leases', l['image'])
  redis.call('HDEL', p .. ':image_lease', l['image'])
  local seq = redis.call('INCR', p .. ':seq')
  redis.call('HSET', l['key'], 'state', state, 'release_seq', seq)
  redis.call('EXPIRE', l['key'], 86400)
  return seq
end
"#;

/// ARGV: prefix, lease_id, expert, ttl_ms, most leases the expert may hold (0: no limit).
/// `P:held:{expert}` holds the expert's lease ids by deadline: leases past theirs no longer
/// count, whether or not they were reclaimed yet. The lease records the serving model version (falling back to the current one), read here
/// so that a lease costs one round trip.
/// With overlap N > 1 (`P:overlap`), the expert gets the first queued image it was never
/// leased (`P:seen:{image}`); a submit queues the image again until it has N marks.
/// Returns {'ok', image, priority, deadline, seq, model_version, width, height}, {'empty'} or
/// {'too_many', held}.
pub const LEASE: &str = r#"
local p, lid, expert, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local most = tonumber(ARGV[5] or '0')
local now = now_ms()
local held = p .. ':held:' .. expert
redis.call('ZREMRANGEBYSCORE', held, '-inf', now)
if most > 0 then
  local n = redis.call('ZCARD', held)
  if n >= most then return {'too_many', tostring(n)} end
end
reclaim(p, now)
local overlap = tonumber(redis.call('GET', p .. ':overlap') or '1') or 1
local img, prio
if overlap <= 1 then
  local popped = redis.call('ZPOPMIN', p .. ':queue')
  if #popped == 0 then return {'empty'} end
  img, prio = popped[1], popped[2]
else
  -- Overlap: the first queued image this expert was never leased (within the first
  -- OVERLAP_SCAN), so that one image goes to several experts, never twice to one.
  local cands = redis.call('ZRANGE', p .. ':queue', 0, OVERLAP_SCAN - 1, 'WITHSCORES')
  for i = 1, #cands, 2 do
    if redis.call('SISMEMBER', p .. ':seen:' .. cands[i], expert) == 0 then
      img, prio = cands[i], cands[i + 1]
      break
    end
  end
  if not img then return {'empty'} end
  redis.call('ZREM', p .. ':queue', img)
  redis.call('SADD', p .. ':seen:' .. img, expert)
end
local version = redis.call('GET', p .. ':model:serving')
if not version then version = redis.call('GET', p .. ':model:current') or '0' end
local size = redis.call('HMGET', p .. ':img:' .. img, 'width', 'height')
local deadline = now + ttl
local seq = redis.call('INCR', p .. ':seq')
redis.call('ZADD', p .. ':leases', deadline, img)
redis.call('HSET', p .. ':image_lease', img, lid)
redis.call('HSET', p .. ':lease:' .. lid, 'image', img, 'expert', expert, 'deadline', deadline,
  'seq', seq, 'state', 'active', 'model_version', version, 'priority', prio,
  'width', size[1] or '0', 'height', size[2] or '0')
redis.call('ZADD', held, deadline, lid)
redis.call('PEXPIRE', held, ttl + 60000)
return {'ok', img, prio, tostring(deadline), seq, version, size[1] or '0', size[2] or '0'}
"#;

/// ARGV: prefix, lease_id, expert, ttl_ms. Returns {'ok', deadline} or {error}.
pub const HEARTBEAT: &str = r#"
local p, lid, expert, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local now = now_ms()
local l, err = active_lease(p, lid, expert, now)
if not l then return {err} end
local deadline = now + ttl
redis.call('HSET', l['key'], 'deadline', deadline)
redis.call('ZADD', p .. ':leases', deadline, l['image'])
redis.call('ZADD', p .. ':held:' .. expert, deadline, lid)
redis.call('PEXPIRE', p .. ':held:' .. expert, ttl + 60000)
return {'ok', tostring(deadline)}
"#;

/// ARGV: prefix, lease_id, expert. Returns {'ok', release_seq} or {error}.
/// The image goes behind every image now queued. Repeating a skip (a retry after a lost
/// reply) answers the first skip's result.
pub const SKIP: &str = r#"
local p, lid, expert = ARGV[1], ARGV[2], ARGV[3]
local prev = redis.call('HMGET', p .. ':lease:' .. lid, 'expert', 'state', 'release_seq')
if prev[1] == expert and prev[2] == 'skipped' then return {'ok', tonumber(prev[3])} end
local now = now_ms()
local l, err = active_lease(p, lid, expert, now)
if not l then return {err} end
local seq = release(p, l, 'skipped')
local last = redis.call('ZRANGE', p .. ':queue', -1, -1, 'WITHSCORES')
local score = tonumber(l['priority'] or '0')
if #last == 2 then score = math.max(score, tonumber(last[2]) + 1) end
redis.call('ZADD', p .. ':queue', score, l['image'])
return {'ok', seq}
"#;

/// ARGV: prefix, lease_id, expert, idempotency_key, mark_id, proposal_id, width, height,
/// mask bytes (one signed byte per pixel), idempotency TTL seconds.
/// Checks ownership, state and that width x height is the leased image's size, then stores
/// the mark, releases the lease, creates the queued proposal and its refine job — one round
/// trip. Returns {'ok'|'dup', mark_id, proposal_id, release_seq, image, the image's mark
/// count, provisional ('1' with overlap > 1)},
/// {'bad_size', image, width, height} or {error}.
pub const SUBMIT: &str = r#"
local p, lid, expert, key = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local idem = p .. ':idem:' .. expert .. ':' .. key
local prev = redis.call('HGETALL', idem)
if #prev > 0 then
  local r = {}
  for i = 1, #prev, 2 do r[prev[i]] = prev[i + 1] end
  return {'dup', r['mark'], r['proposal'], tonumber(r['seq']), r['image'], r['count'] or '1',
    r['provisional'] or '0'}
end
local now = now_ms()
local l, err = active_lease(p, lid, expert, now)
if not l then return {err} end
local size = redis.call('HMGET', p .. ':img:' .. l['image'], 'width', 'height')
if size[1] ~= ARGV[7] or size[2] ~= ARGV[8] then
  return {'bad_size', l['image'], size[1] or '0', size[2] or '0'}
end
local mark, prop = ARGV[5], ARGV[6]
local version = l['model_version']
redis.call('HSET', p .. ':mark:' .. mark, 'image', l['image'], 'expert', expert, 'time_ms', now,
  'model_version', version, 'width', ARGV[7], 'height', ARGV[8], 'mask', ARGV[9],
  'idempotency_key', key, 'lease', lid, 'proposal', prop)
redis.call('RPUSH', p .. ':marks', mark)
redis.call('RPUSH', p .. ':marks:image:' .. l['image'], mark)
redis.call('HINCRBY', p .. ':marks_per_expert', expert, 1)
local seq = release(p, l, 'submitted')
-- Overlap: the image goes back to the queue, at its priority, until it has that many marks.
local overlap = tonumber(redis.call('GET', p .. ':overlap') or '1') or 1
local count = redis.call('LLEN', p .. ':marks:image:' .. l['image'])
if overlap > 1 and count < overlap then
  redis.call('ZADD', p .. ':queue', redis.call('HGET', p .. ':prio', l['image']) or l['priority'] or '0', l['image'])
end
-- With overlap, a mark is provisional until the image's marks are settled; the N-th mark
-- puts the image in `P:unsettled`, which a gateway (or its reaper's sweep) settles.
local provisional = '0'
if overlap > 1 then
  provisional = '1'
  if count >= overlap and redis.call('HEXISTS', p .. ':settled', l['image']) == 0
     and redis.call('HEXISTS', p .. ':review:kappa', l['image']) == 0 then
    redis.call('SADD', p .. ':unsettled', l['image'])
  end
end
redis.call('HSET', p .. ':proposal:' .. prop, 'status', 'queued', 'mark', mark, 'image', l['image'],
  'expert', expert, 'base_version', version, 'created_ms', now, 'updated_ms', now,
  'provisional', provisional)
redis.call('XADD', p .. ':jobs:refine', '*', 'kind', 'refine', 'proposal', prop, 'mark', mark,
  'image', l['image'], 'expert', expert, 'base_version', version, 'enqueued_ms', now)
audit(p, 'mark', expert, {'image', l['image'], 'mark', mark, 'proposal', prop,
  'version_before', version})
redis.call('HSET', idem, 'mark', mark, 'proposal', prop, 'seq', seq, 'image', l['image'],
  'count', count, 'provisional', provisional)
redis.call('EXPIRE', idem, tonumber(ARGV[10]))
return {'ok', mark, prop, seq, l['image'], count, provisional}
"#;

/// ARGV: prefix, mark_id, image, expert, time_ms, model_version, width, height, mask bytes,
/// source. Stores a mark made elsewhere (`mp import marks`): no lease, no proposal. Skipped
/// when the expert has marked the image already. Returns {'ok'}, {'dup', mark_id},
/// {'not_found'} (no such image) or {'bad_size', width, height}.
pub const IMPORT_MARK: &str = r#"
local p, mark, img, expert = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local size = redis.call('HMGET', p .. ':img:' .. img, 'width', 'height')
if not size[1] then return {'not_found'} end
if size[1] ~= ARGV[7] or size[2] ~= ARGV[8] then return {'bad_size', size[1], size[2]} end
for _, m in ipairs(redis.call('LRANGE', p .. ':marks:image:' .. img, 0, -1)) do
  if redis.call('HGET', p .. ':mark:' .. m, 'expert') == expert then return {'dup', m} end
end
redis.call('HSET', p .. ':mark:' .. mark, 'image', img, 'expert', expert, 'time_ms', ARGV[5],
  'model_version', ARGV[6], 'width', ARGV[7], 'height', ARGV[8], 'mask', ARGV[9],
  'idempotency_key', 'import', 'lease', '', 'proposal', '', 'source', ARGV[10])
redis.call('RPUSH', p .. ':marks', mark)
redis.call('RPUSH', p .. ':marks:image:' .. img, mark)
redis.call('HINCRBY', p .. ':marks_per_expert', expert, 1)
return {'ok'}
"#;

/// ARGV: prefix. Returns {'ok', reclaimed}.
pub const RECLAIM: &str = r#"
return {'ok', reclaim(ARGV[1], now_ms())}
"#;

/// ARGV: prefix, then image, priority pairs. Queues images that are neither leased nor
/// marked (with overlap N: marked fewer than N times); updates the priority of those already
/// queued. Returns {'ok', queued}.
pub const ENQUEUE: &str = r#"
local p = ARGV[1]
local n = 0
local overlap = tonumber(redis.call('GET', p .. ':overlap') or '1') or 1
for i = 2, #ARGV, 2 do
  local img, prio = ARGV[i], ARGV[i + 1]
  redis.call('HSET', p .. ':prio', img, prio)
  if redis.call('ZSCORE', p .. ':leases', img) == false
     and redis.call('LLEN', p .. ':marks:image:' .. img) < overlap then
    redis.call('ZADD', p .. ':queue', prio, img)
    n = n + 1
  end
end
return {'ok', n}
"#;

/// May expert ARGV[3] see image ARGV[2]? `{'ok', 1}` when it holds the image's lease or its
/// review lease, or has marked the image, else `{'ok', 0}` (who may see what: ARCHITECTURE.md).
pub const MAY_VIEW: &str = r#"
local p, img, expert = ARGV[1], ARGV[2], ARGV[3]
local lid = redis.call('HGET', p .. ':image_lease', img)
if lid and redis.call('HGET', p .. ':lease:' .. lid, 'expert') == expert then
  return {'ok', 1}
end
local rid = redis.call('HGET', p .. ':review:holder', img)
if rid and redis.call('HGET', p .. ':review:lease:' .. rid, 'reviewer') == expert then
  return {'ok', 1}
end
for _, m in ipairs(redis.call('LRANGE', p .. ':marks:image:' .. img, 0, -1)) do
  if redis.call('HGET', p .. ':mark:' .. m, 'expert') == expert then return {'ok', 1} end
end
return {'ok', 0}
"#;

/// ARGV: prefix, proposal, decider, decision (`commit` or `reject`). A `ready` proposal
/// becomes `committing` with its commit job queued in the same step, or `rejected`: two
/// decisions cannot both win, and no proposal is `committing` without a job. A provisional
/// one becomes `endorsed` instead of `committing`: no job, never guidance.
/// Returns {'ok', status} or {'not_found'} or {'not_ready', status}.
pub const DECIDE: &str = r#"
local p, prop, who, decision = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local key = p .. ':proposal:' .. prop
local status = redis.call('HGET', key, 'status')
if not status then return {'not_found'} end
if status ~= 'ready' then return {'not_ready', status} end
local now = now_ms()
local h = redis.call('HMGET', key, 'image', 'expert', 'base_version', 'provisional')
-- A provisional proposal (overlap: its mark is not settled) is never committed: committing
-- it endorses it, the expert's vote that its mark helps.
if decision == 'commit' and h[4] == '1' then decision = 'endorse' end
audit(p, 'decision', who, {'decision', decision, 'proposal', prop, 'image', h[1], 'expert', h[2],
  'version_before', h[3]})
if decision == 'endorse' then
  redis.call('HSET', key, 'status', 'endorsed', 'decided_by', who, 'updated_ms', now)
  return {'ok', 'endorsed'}
end
if decision == 'commit' then
  redis.call('HSET', key, 'status', 'committing', 'decided_by', who, 'updated_ms', now)
  redis.call('XADD', p .. ':jobs:commit', '*', 'proposal', prop, 'expert', who)
  return {'ok', 'committing'}
end
redis.call('HSET', key, 'status', 'rejected', 'decided_by', who, 'updated_ms', now)
return {'ok', 'rejected'}
"#;

/// ARGV: prefix, version, parent, record JSON, then optionally a proposal id followed by
/// field, value pairs. Publishes a version only on top of its parent (compare-and-set on
/// `model:current`: a rollback in between is never overwritten) and, for a commit, marks the
/// proposal `committed` and adds its mark to the guidance in the same step, so a crash
/// cannot leave one without the other and a redelivered commit is recognised.
/// Returns {'ok'}, {'exists'}, {'moved', current}, {'committed', version} or
/// {'not_committing', status}.
pub const PUBLISH: &str = r#"
local p, version, parent, json = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('HEXISTS', p .. ':model:versions', version) == 1 then return {'exists'} end
local current = redis.call('GET', p .. ':model:current') or '0'
if current ~= parent then return {'moved', current} end
local prop = ARGV[5]
local key
if prop then
  key = p .. ':proposal:' .. prop
  local status = redis.call('HGET', key, 'status')
  if status == 'committed' then
    return {'committed', redis.call('HGET', key, 'committed_version') or '0'}
  end
  if status ~= 'committing' and status ~= 'rebasing' then
    return {'not_committing', status or 'missing'}
  end
end
local before = redis.call('HGET', p .. ':model:versions', parent)
local acc_before = (before and cjson.decode(before)['val_accuracy']) or false
local rec = cjson.decode(json)
local who, fields = 'trainer', {'version_before', parent, 'version_after', version,
  'accuracy_before', acc_before, 'accuracy_after', rec['val_accuracy'] or false,
  'reason', rec['reason'] or false}
if prop then
  local h = redis.call('HMGET', key, 'expert', 'image', 'mark')
  who = h[1] or 'trainer'
  for _, v in ipairs({'proposal', prop, 'image', h[2], 'mark', h[3]}) do table.insert(fields, v) end
end
audit(p, prop and 'commit' or 'version', who, fields)
redis.call('HSET', p .. ':model:versions', version, json)
redis.call('SET', p .. ':model:current', version)
if prop then
  redis.call('HSET', key, 'status', 'committed', 'committed_version', version,
    'updated_ms', now_ms())
  for i = 6, #ARGV, 2 do redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
  local mark = redis.call('HGET', key, 'mark')
  if mark and redis.call('SADD', p .. ':guidance:set', mark) == 1 then
    redis.call('RPUSH', p .. ':guidance', mark)
  end
end
return {'ok'}
"#;

/// ARGV: prefix, stream, group, max deliveries, then job ids just claimed. Every job among
/// them delivered more than `max` times moves to the stream's dead letters (`{stream}:dead`,
/// with its fields, its last error from `{stream}:errors`, its delivery count) and is
/// acknowledged; a proposal it was working on becomes `failed`. Returns the dead ids.
pub const DEAD_LETTER: &str = r#"
local p, stream, group, max = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local key = p .. ':' .. stream
local dead = {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local pend = redis.call('XPENDING', key, group, id, id, 1)
  if #pend == 1 and tonumber(pend[1][4]) > max then
    local n = tostring(pend[1][4])
    local entry = redis.call('XRANGE', key, id, id)
    local fields = {}
    if #entry == 1 then fields = entry[1][2] end
    local err = redis.call('HGET', key .. ':errors', id)
      or 'the process handling it stopped (a crash or a kill) each time'
    local now = now_ms()
    local args = {}
    for _, f in ipairs(fields) do table.insert(args, f) end
    for _, f in ipairs({'job_id', id, 'deliveries', n, 'error', err, 'dead_ms', now}) do
      table.insert(args, f)
    end
    redis.call('XADD', key .. ':dead', 'MAXLEN', '~', 10000, '*', unpack(args))
    redis.call('XACK', key, group, id)
    redis.call('HDEL', key .. ':errors', id)
    for j = 1, #fields, 2 do
      if fields[j] == 'proposal' then
        local pk = p .. ':proposal:' .. fields[j + 1]
        local st = redis.call('HGET', pk, 'status')
        if st == 'queued' or st == 'running' or st == 'committing' or st == 'rebasing' then
          redis.call('HSET', pk, 'status', 'failed', 'updated_ms', now,
            'message', 'given up after ' .. n .. ' deliveries: ' .. err)
        end
      end
    end
    table.insert(dead, id)
  end
end
return dead
"#;

/// ARGV: prefix, image, kappa. Queues an image whose marks disagree for review (`P:review`,
/// lowest κ first; `P:review:kappa` holds every image waiting or under review). Returns
/// {'ok'}, {'dup'} (waiting already) or {'settled'}.
pub const QUEUE_REVIEW: &str = r#"
local p, img, kappa = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HEXISTS', p .. ':settled', img) == 1 then
  redis.call('SREM', p .. ':unsettled', img)
  return {'settled'}
end
if redis.call('HEXISTS', p .. ':review:kappa', img) == 1 then
  redis.call('SREM', p .. ':unsettled', img)
  return {'dup'}
end
redis.call('HSET', p .. ':review:kappa', img, kappa)
redis.call('ZADD', p .. ':review', kappa, img)
redis.call('SREM', p .. ':unsettled', img)
audit(p, 'review_queued', 'system', {'image', img, 'kappa', kappa})
return {'ok'}
"#;

/// ARGV: prefix, lease_id, reviewer, ttl_ms. Returns expired review leases to the review
/// queue, then leases the image with the lowest agreement that the reviewer did not mark
/// itself (within the first 256). Returns {'ok', image, kappa, deadline} or {'empty'}.
pub const LEASE_REVIEW: &str = r#"
local p, lid, reviewer, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local now = now_ms()
for _, img in ipairs(redis.call('ZRANGEBYSCORE', p .. ':review:leases', '-inf', now)) do
  local old = redis.call('HGET', p .. ':review:holder', img)
  redis.call('ZREM', p .. ':review:leases', img)
  redis.call('HDEL', p .. ':review:holder', img)
  if old then
    redis.call('HSET', p .. ':review:lease:' .. old, 'state', 'expired')
    redis.call('EXPIRE', p .. ':review:lease:' .. old, 86400)
  end
  local k = redis.call('HGET', p .. ':review:kappa', img)
  if k then redis.call('ZADD', p .. ':review', k, img) end
end
local cands = redis.call('ZRANGE', p .. ':review', 0, 255, 'WITHSCORES')
local img, kappa
for i = 1, #cands, 2 do
  local own = false
  for _, m in ipairs(redis.call('LRANGE', p .. ':marks:image:' .. cands[i], 0, -1)) do
    if redis.call('HGET', p .. ':mark:' .. m, 'expert') == reviewer then own = true end
  end
  if not own then img, kappa = cands[i], cands[i + 1]; break end
end
if not img then return {'empty'} end
redis.call('ZREM', p .. ':review', img)
local deadline = now + ttl
redis.call('ZADD', p .. ':review:leases', deadline, img)
redis.call('HSET', p .. ':review:holder', img, lid)
redis.call('HSET', p .. ':review:lease:' .. lid, 'image', img, 'reviewer', reviewer,
  'deadline', deadline, 'state', 'active', 'kappa', kappa)
return {'ok', img, kappa, tostring(deadline)}
"#;

/// ARGV: prefix, image, mark_id, proposal_id ('' for an empty settled mark: nothing to
/// learn), owner, width, height, mask bytes, how, kappa, the settled marks' ids (comma
/// separated), review lease id ('' for an automatic settlement).
/// Settles an image's marks once: stores the settled mark (`settled_from`, `how`), records
/// it in `P:settled`, takes the image off the review queue and `P:unsettled`, and creates the
/// settled mark's proposal (owned by `owner`, not provisional) with its refine job — the
/// only way a mark of an overlapping project reaches a commit. A review settlement needs the
/// reviewer's active review lease; an automatic one is refused while the image waits for
/// review. Returns {'ok', mark, proposal}, {'dup', mark, proposal} (settled already),
/// {'in_review'}, {'bad_size', width, height} or a lease error word.
pub const SETTLE: &str = r#"
local p, img, mark, prop, owner = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local lid = ARGV[12]
local now = now_ms()
local done = redis.call('HGET', p .. ':settled', img)
if done then
  return {'dup', done, redis.call('HGET', p .. ':mark:' .. done, 'proposal') or ''}
end
-- Every check before the first write: a refused settlement changes nothing.
local size = redis.call('HMGET', p .. ':img:' .. img, 'width', 'height')
if size[1] ~= ARGV[6] or size[2] ~= ARGV[7] then return {'bad_size', size[1] or '0', size[2] or '0'} end
if lid ~= '' then
  local rl = redis.call('HMGET', p .. ':review:lease:' .. lid, 'image', 'reviewer', 'deadline', 'state')
  if not rl[1] or rl[1] ~= img then return {'not_found'} end
  if rl[2] ~= owner then return {'not_owner'} end
  if rl[4] ~= 'active' then return {rl[4]} end
  if tonumber(rl[3]) <= now then return {'expired'} end
  redis.call('HSET', p .. ':review:lease:' .. lid, 'state', 'settled')
  redis.call('EXPIRE', p .. ':review:lease:' .. lid, 86400)
  redis.call('ZREM', p .. ':review:leases', img)
  redis.call('HDEL', p .. ':review:holder', img)
elseif redis.call('HEXISTS', p .. ':review:kappa', img) == 1 then
  return {'in_review'}
end
redis.call('HDEL', p .. ':review:kappa', img)
redis.call('ZREM', p .. ':review', img)
redis.call('SREM', p .. ':unsettled', img)
redis.call('HSET', p .. ':settled', img, mark)
local version = redis.call('GET', p .. ':model:serving')
if not version then version = redis.call('GET', p .. ':model:current') or '0' end
redis.call('HSET', p .. ':mark:' .. mark, 'image', img, 'expert', owner, 'time_ms', now,
  'model_version', version, 'width', ARGV[6], 'height', ARGV[7], 'mask', ARGV[8],
  'idempotency_key', 'settle', 'lease', lid, 'proposal', prop, 'settled_from', ARGV[11],
  'how', ARGV[9], 'kappa', ARGV[10])
redis.call('RPUSH', p .. ':settled_marks', mark)
if prop ~= '' then
  redis.call('HSET', p .. ':proposal:' .. prop, 'status', 'queued', 'mark', mark, 'image', img,
    'expert', owner, 'base_version', version, 'created_ms', now, 'updated_ms', now,
    'provisional', '0', 'settled', '1')
  redis.call('XADD', p .. ':jobs:refine', '*', 'kind', 'refine', 'proposal', prop, 'mark', mark,
    'image', img, 'expert', owner, 'base_version', version, 'enqueued_ms', now)
end
audit(p, 'settle', owner, {'image', img, 'mark', mark, 'proposal', prop, 'how', ARGV[9],
  'kappa', ARGV[10], 'from', ARGV[11], 'version_before', version})
return {'ok', mark, prop}
"#;

pub fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{PRELUDE}\n{body}"))
}
