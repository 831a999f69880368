//! The job streams (refine, score, commit) with consumer groups, and the counters behind the stats.

use super::*;

impl Store {
    /// Appends a job to a stream (`jobs:refine`, `jobs:score`, `jobs:commit`).
    pub async fn add_job(&self, stream: &str, fields: &[(&str, String)]) -> Result<String> {
        let mut c = self.conn.clone();
        Ok(c.xadd(self.k(stream), "*", fields).await?)
    }

    /// A group's backlog on a stream: jobs not yet delivered plus delivered and not yet
    /// acknowledged (0 once every job appended so far is done).
    pub async fn backlog(&self, stream: &str, group: &str) -> Result<u64> {
        Ok(self
            .group_info(stream, group)
            .await?
            .map(|g| num(&g, "lag") + num(&g, "pending"))
            .unwrap_or(0))
    }

    async fn group_info(
        &self,
        stream: &str,
        group: &str,
    ) -> Result<Option<HashMap<String, redis::Value>>> {
        let mut c = self.conn.clone();
        let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(self.k(stream))
            .query_async(&mut c)
            .await?;
        Ok(groups
            .into_iter()
            .find(|g| g.get("name").map(value_string).as_deref() == Some(group)))
    }

    /// Redis's `used_memory` (bytes), as `INFO memory` reports it.
    pub async fn used_memory(&self) -> Result<u64> {
        let mut c = self.conn.clone();
        let info: String = redis::cmd("INFO").arg("memory").query_async(&mut c).await?;
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| StoreError::Corrupt("INFO memory has no used_memory".into()))
    }

    /// New jobs for `consumer` of `group`, waiting up to `block_ms`.
    pub async fn read_jobs(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block_ms: usize,
    ) -> Result<Vec<Job>> {
        let mut c = self.conn.clone();
        let opts = redis::streams::StreamReadOptions::default()
            .group(group, consumer)
            .count(count)
            .block(block_ms);
        let r: Option<redis::streams::StreamReadReply> =
            c.xread_options(&[self.k(stream)], &[">"], &opts).await?;
        Ok(r.map(|r| {
            r.keys
                .into_iter()
                .flat_map(|k| k.ids)
                .map(Job::from_stream_id)
                .collect()
        })
        .unwrap_or_default())
    }

    /// Takes over jobs delivered to a consumer that has been silent for `min_idle_ms`
    /// (a worker that died mid-job). A job delivered more than `max_deliveries` times (a
    /// poison job that brings down every process that takes it) goes to the stream's dead
    /// letters instead, with its last error ([`Store::note_job_error`]).
    pub async fn reclaim_jobs(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle_ms: u64,
        count: usize,
        max_deliveries: u64,
    ) -> Result<Vec<Job>> {
        let claimed = self
            .autoclaim(stream, group, consumer, min_idle_ms, count)
            .await?;
        if claimed.is_empty() {
            return Ok(claimed);
        }
        let mut c = self.conn.clone();
        let mut inv = self.scripts.dead_letter.prepare_invoke();
        inv.arg(&self.prefix)
            .arg(stream)
            .arg(group)
            .arg(max_deliveries.max(1));
        for j in &claimed {
            inv.arg(&j.id);
        }
        let dead: Vec<String> = inv.invoke_async(&mut c).await?;
        if !dead.is_empty() {
            tracing::warn!(stream, jobs = ?dead, max_deliveries, "jobs given up on: moved to the dead letters");
        }
        Ok(claimed
            .into_iter()
            .filter(|j| !dead.contains(&j.id))
            .collect())
    }

    /// Trims the job streams of what every consumer is done with: entries older than the
    /// oldest one still pending and than the last one delivered (`XTRIM … MINID ~`), so
    /// that acknowledged jobs do not pile up in Redis for ever. Never removes a job that
    /// was not delivered or is still pending. Returns the entries removed.
    pub async fn trim_streams(&self) -> Result<u64> {
        let mut c = self.conn.clone();
        let mut removed = 0;
        for (stream, group) in [
            (REFINE_STREAM, "refine"),
            (SCORE_STREAM, "score"),
            (COMMIT_STREAM, "commit"),
        ] {
            let key = self.k(stream);
            let exists: bool = c.exists(&key).await?;
            if !exists {
                continue;
            }
            let groups: redis::streams::StreamInfoGroupsReply = c.xinfo_groups(&key).await?;
            let Some(g) = groups.groups.iter().find(|g| g.name == group) else {
                continue;
            };
            let pending: redis::streams::StreamPendingReply = c.xpending(&key, group).await?;
            let keep_from = match pending {
                redis::streams::StreamPendingReply::Data(d) => d.start_id,
                _ => g.last_delivered_id.clone(),
            };
            let n: u64 = redis::cmd("XTRIM")
                .arg(&key)
                .arg("MINID")
                .arg("~")
                .arg(&keep_from)
                .query_async(&mut c)
                .await?;
            removed += n;
        }
        Ok(removed)
    }

    /// Remembers why a job failed this time (a week at most), for its dead letter should it
    /// be given up on.
    pub async fn note_job_error(&self, stream: &str, id: &str, error: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let key = self.k(&format!("{stream}:errors"));
        let error: String = error.chars().take(2000).collect();
        let _: () = redis::pipe()
            .hset(&key, id, error)
            .ignore()
            .expire(&key, IDEMPOTENCY_TTL_S as i64)
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// The dead letters of every job stream, newest first, at most `count`.
    pub async fn dead_jobs(&self, count: usize) -> Result<Vec<DeadJob>> {
        let mut c = self.conn.clone();
        let mut out = Vec::new();
        for stream in JOB_STREAMS {
            let r: redis::streams::StreamRangeReply = c
                .xrevrange_count(self.k(&format!("{stream}:dead")), "+", "-", count)
                .await?;
            for e in r.ids {
                let mut job = Job::from_stream_id(e);
                let mut take = |k: &str| job.fields.remove(k).unwrap_or_default();
                let (job_id, deliveries, error, dead_ms) = (
                    take("job_id"),
                    take("deliveries"),
                    take("error"),
                    take("dead_ms"),
                );
                out.push(DeadJob {
                    stream: stream.to_string(),
                    job_id,
                    deliveries: deliveries.parse().unwrap_or(0),
                    error,
                    dead_ms: dead_ms.parse().unwrap_or(0),
                    fields: job.fields,
                });
            }
        }
        out.sort_by_key(|j| std::cmp::Reverse(j.dead_ms));
        out.truncate(count);
        Ok(out)
    }

    async fn autoclaim(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle_ms: u64,
        count: usize,
    ) -> Result<Vec<Job>> {
        let mut c = self.conn.clone();
        let r: redis::Value = redis::cmd("XAUTOCLAIM")
            .arg(self.k(stream))
            .arg(group)
            .arg(consumer)
            .arg(min_idle_ms)
            .arg("0-0")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut c)
            .await?;
        let mut out = Vec::new();
        if let redis::Value::Array(parts) = r {
            if let Some(redis::Value::Array(entries)) = parts.get(1) {
                for e in entries {
                    if let redis::Value::Array(pair) = e {
                        if let (Some(id), Some(redis::Value::Array(kv))) =
                            (pair.first(), pair.get(1))
                        {
                            let mut fields = HashMap::new();
                            for ch in kv.chunks(2) {
                                if let [k, v] = ch {
                                    fields.insert(value_string(k), value_string(v));
                                }
                            }
                            out.push(Job {
                                id: value_string(id),
                                fields,
                            });
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Resets the idle time of jobs `consumer` is still working on (`XCLAIM … JUSTID` to
    /// itself), so that no worker takes over a job that is slow rather than abandoned.
    pub async fn touch_jobs(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        ids: &[String],
    ) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut c = self.conn.clone();
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(self.k(stream))
            .arg(group)
            .arg(consumer)
            .arg(0)
            .arg(ids)
            .arg("JUSTID")
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    pub async fn ack(&self, stream: &str, group: &str, id: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let _: u64 = c.xack(self.k(stream), group, &[id]).await?;
        Ok(())
    }

    /// Creates the job streams and their consumer groups if missing.
    pub async fn ensure_job_groups(&self) -> Result<()> {
        let mut c = self.conn.clone();
        for (stream, group) in [
            (REFINE_STREAM, "refine"),
            (SCORE_STREAM, "score"),
            (COMMIT_STREAM, "commit"),
            (VIEW_STREAM, "view"),
        ] {
            let r: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(self.k(stream))
                .arg(group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut c)
                .await;
            if let Err(e) = r {
                if e.code() != Some("BUSYGROUP") {
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Asks the workers for the view of `image` under `version` (the stream is capped: a
    /// request nobody served for long is of no use to the expert who made it).
    pub async fn request_view(&self, version: u64, image: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let _: String = redis::cmd("XADD")
            .arg(self.k(VIEW_STREAM))
            .arg("MAXLEN")
            .arg("~")
            .arg(10_000)
            .arg("*")
            .arg("version")
            .arg(version)
            .arg("image")
            .arg(image)
            .arg("t")
            .arg(now_ms())
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Tells every subscriber (`view_events`) that the views of `ids` under `version` are
    /// in the image store.
    pub async fn views_ready(&self, version: u64, ids: &[&str]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut payload = version.to_string();
        for id in ids {
            payload.push('\n');
            payload.push_str(id);
        }
        let mut c = self.conn.clone();
        let _: u64 = c.publish(self.k("views:ready"), payload).await?;
        Ok(())
    }

    /// The announcements of `views_ready`, as (version, image ids), on a connection of its
    /// own; the stream ends when that connection is lost.
    pub async fn view_events(
        &self,
    ) -> Result<impl futures::Stream<Item = (u64, Vec<String>)> + Send + 'static> {
        use futures::StreamExt;
        let mut sub = self.client.get_async_pubsub().await?;
        sub.subscribe(self.k("views:ready")).await?;
        Ok(sub.into_on_message().filter_map(|m| async move {
            let payload: String = m.get_payload().ok()?;
            let mut lines = payload.split('\n');
            let version = lines.next()?.parse().ok()?;
            Some((version, lines.map(String::from).collect()))
        }))
    }

    /// Records that `consumer` serves view requests now (a worker's view loop calls this
    /// while it runs; stream consumers cannot tell, as Redis creates one only when it is
    /// first delivered an entry).
    pub async fn view_worker_alive(&self, consumer: &str) -> Result<()> {
        let now = now_ms();
        let mut c = self.conn.clone();
        let _: () = redis::pipe()
            .zadd(self.k("views:workers"), consumer, now)
            .ignore()
            .zrembyscore(self.k("views:workers"), "-inf", now.saturating_sub(60_000))
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Workers that said within the last `within_ms` that they serve view requests.
    pub async fn view_workers(&self, within_ms: u64) -> Result<u64> {
        let mut c = self.conn.clone();
        Ok(c.zcount(
            self.k("views:workers"),
            now_ms().saturating_sub(within_ms),
            "+inf",
        )
        .await?)
    }

    pub async fn counts(&self) -> Result<Counts> {
        let mut c = self.conn.clone();
        let since = now_ms().saturating_sub(ONLINE_WINDOW_MS);
        // One round trip: the counts, then the dead letters of every job stream.
        let mut pipe = redis::pipe();
        pipe.zcard(self.k("queue"))
            .zcard(self.k("leases"))
            .zcount(self.k("online"), since, "+inf")
            .llen(self.k("marks"));
        for stream in JOB_STREAMS {
            pipe.xlen(self.k(&format!("{stream}:dead")));
        }
        let n: Vec<u64> = pipe.query_async(&mut c).await?;
        let refine_pending = self
            .stream_backlog(REFINE_STREAM, "refine")
            .await
            .unwrap_or(0);
        Ok(Counts {
            queue_depth: n[0],
            leases_out: n[1],
            experts_online: n[2],
            marks_total: n[3],
            refine_pending,
            dead_jobs: n[4..].iter().sum(),
        })
    }

    /// [`Store::backlog`], 0 when the stream or the group does not exist yet.
    pub async fn stream_backlog(&self, stream: &str, group: &str) -> Result<u64> {
        Ok(self.backlog(stream, group).await.unwrap_or(0))
    }
}

fn num(g: &HashMap<String, redis::Value>, k: &str) -> u64 {
    match g.get(k) {
        Some(redis::Value::Int(i)) => (*i).max(0) as u64,
        Some(v) => value_string(v).parse().unwrap_or(0),
        None => 0,
    }
}
