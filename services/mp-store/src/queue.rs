//! The review queue: priorities, leases (atomic Lua claims), heartbeats, skips, submits and the return of expired leases.

use super::*;

impl Store {
    /// Queues (or re-prioritises) images that are neither leased nor marked.
    pub async fn enqueue(&self, items: &[(String, f64)]) -> Result<u64> {
        let mut c = self.conn.clone();
        let mut total = 0u64;
        for chunk in items.chunks(1000) {
            let mut inv = self.scripts.enqueue.prepare_invoke();
            inv.arg(&self.prefix);
            for (id, p) in chunk {
                inv.arg(id).arg(*p);
            }
            let r: (String, u64) = inv.invoke_async(&mut c).await?;
            total += r.1;
        }
        Ok(total)
    }

    /// Claims the lowest-priority image for `expert` for `ttl_ms`; `None` when the queue is empty.
    pub async fn lease(&self, expert: &str, ttl_ms: u64) -> Result<Option<LeaseGrant>> {
        self.lease_limited(expert, ttl_ms, 0).await
    }

    /// [`Store::lease`] for an expert who may hold at most `most` leases at once (0: no
    /// limit); one more is [`StoreError::ResourceExhausted`].
    pub async fn lease_limited(
        &self,
        expert: &str,
        ttl_ms: u64,
        most: u64,
    ) -> Result<Option<LeaseGrant>> {
        let mut c = self.conn.clone();
        let lease_id = new_id();
        let v: Vec<redis::Value> = self
            .scripts
            .lease
            .arg(&self.prefix)
            .arg(&lease_id)
            .arg(expert)
            .arg(ttl_ms)
            .arg(most)
            .invoke_async(&mut c)
            .await?;
        let words: Vec<String> = v.iter().map(value_string).collect();
        match words.first().map(String::as_str) {
            Some("ok") if words.len() == 8 => Ok(Some(LeaseGrant {
                lease_id,
                image_id: words[1].clone(),
                priority: words[2].parse().unwrap_or(0.0),
                deadline_ms: words[3].parse().unwrap_or(0),
                seq: words[4].parse().unwrap_or(0),
                model_version: words[5].parse().unwrap_or(0),
                width: words[6].parse().unwrap_or(0),
                height: words[7].parse().unwrap_or(0),
            })),
            Some("empty") => Ok(None),
            Some("too_many") => Err(StoreError::ResourceExhausted(format!(
                "you hold {} leases, the most an expert may: submit or skip one first",
                words.get(1).map(String::as_str).unwrap_or("?")
            ))),
            other => Err(StoreError::Corrupt(format!(
                "lease script answered {other:?}"
            ))),
        }
    }

    pub async fn heartbeat(&self, lease_id: &str, expert: &str, ttl_ms: u64) -> Result<u64> {
        let mut c = self.conn.clone();
        let v: Vec<redis::Value> = self
            .scripts
            .heartbeat
            .arg(&self.prefix)
            .arg(lease_id)
            .arg(expert)
            .arg(ttl_ms)
            .invoke_async(&mut c)
            .await?;
        number_answer(&v, lease_id)
    }

    pub async fn skip(&self, lease_id: &str, expert: &str) -> Result<u64> {
        let mut c = self.conn.clone();
        let v: Vec<redis::Value> = self
            .scripts
            .skip
            .arg(&self.prefix)
            .arg(lease_id)
            .arg(expert)
            .invoke_async(&mut c)
            .await?;
        number_answer(&v, lease_id)
    }

    /// What a lease refers to (any state), or NotFound.
    pub async fn lease_info(&self, lease_id: &str) -> Result<LeaseInfo> {
        let mut c = self.conn.clone();
        let h: HashMap<String, Vec<u8>> = c.hgetall(self.k(&format!("lease:{lease_id}"))).await?;
        if h.is_empty() {
            return Err(StoreError::NotFound(format!(
                "lease {lease_id} does not exist"
            )));
        }
        Ok(LeaseInfo {
            image_id: text(&h, "image"),
            expert_id: text(&h, "expert"),
            state: text(&h, "state"),
            seq: field(&h, "seq").unwrap_or(0),
            release_seq: field(&h, "release_seq").unwrap_or(0),
        })
    }

    /// Stores `values` (one per pixel, row-major) as the mark for the leased image, atomically
    /// with the lease release, the queued proposal and its refine job. A repeat of
    /// `idempotency_key` by the same expert returns the first result and stores nothing.
    pub async fn submit(
        &self,
        lease_id: &str,
        expert: &str,
        idempotency_key: &str,
        width: u32,
        height: u32,
        values: &[i8],
    ) -> Result<SubmitResult> {
        if idempotency_key.is_empty() || idempotency_key.len() > 128 {
            return Err(StoreError::InvalidArgument(
                "idempotency_key must hold 1 to 128 characters".into(),
            ));
        }
        let mut c = self.conn.clone();
        let bytes: Vec<u8> = values.iter().map(|&v| v as u8).collect();
        let v: Vec<redis::Value> = self
            .scripts
            .submit
            .arg(&self.prefix)
            .arg(lease_id)
            .arg(expert)
            .arg(idempotency_key)
            .arg(new_id())
            .arg(new_id())
            .arg(width)
            .arg(height)
            .arg(bytes)
            .arg(IDEMPOTENCY_TTL_S)
            .invoke_async(&mut c)
            .await?;
        let words: Vec<String> = v.iter().map(value_string).collect();
        match words.first().map(String::as_str) {
            Some(w @ ("ok" | "dup")) if words.len() >= 5 => Ok(SubmitResult {
                mark_id: words[1].clone(),
                proposal_id: words[2].clone(),
                release_seq: words[3].parse().unwrap_or(0),
                image_id: words[4].clone(),
                duplicate: w == "dup",
                marks_on_image: words.get(5).and_then(|s| s.parse().ok()).unwrap_or(1),
                provisional: words.get(6).is_some_and(|s| s == "1"),
            }),
            Some("bad_size") if words.len() == 4 => Err(StoreError::InvalidArgument(format!(
                "mask is {width}x{height} but image {} is {}x{}",
                words[1], words[2], words[3]
            ))),
            Some(w) => Err(lease_error(w, lease_id)),
            None => Err(StoreError::Corrupt("empty submit answer".into())),
        }
    }

    /// Returns expired leases to the queue; how many.
    pub async fn reclaim(&self) -> Result<u64> {
        let mut c = self.conn.clone();
        let r: (String, u64) = self
            .scripts
            .reclaim
            .arg(&self.prefix)
            .invoke_async(&mut c)
            .await?;
        Ok(r.1)
    }

    /// Whether `expert` holds `image`'s lease or has marked it: what lets an expert (not an
    /// admin) see an image.
    pub async fn may_view(&self, expert: &str, image: &str) -> Result<bool> {
        let mut c = self.conn.clone();
        let r: (String, u64) = self
            .scripts
            .may_view
            .arg(&self.prefix)
            .arg(image)
            .arg(expert)
            .invoke_async(&mut c)
            .await?;
        Ok(r.1 == 1)
    }

    /// Checks a submit's lease before its mask is decoded: the lease exists and is
    /// `expert`'s, and the mask's claimed size is the leased image's (so a small request
    /// cannot make the gateway build a mask of the largest size for nothing). A repeat of an
    /// earlier submit (its idempotency key known) passes, whatever became of its lease, and so
    /// do leases made before leases recorded their image's size: the submit script checks
    /// everything again.
    pub async fn check_submit(
        &self,
        lease: &str,
        expert: &str,
        key: &str,
        width: u32,
        height: u32,
    ) -> Result<()> {
        let mut c = self.conn.clone();
        type LeaseShape = (Option<String>, Option<u32>, Option<u32>);
        let ((owner, w, h), repeat): (LeaseShape, bool) = redis::pipe()
            .cmd("HMGET")
            .arg(self.k(&format!("lease:{lease}")))
            .arg(&["expert", "width", "height"])
            .exists(self.k(&format!("idem:{expert}:{key}")))
            .query_async(&mut c)
            .await?;
        if repeat {
            return Ok(());
        }
        match owner {
            None => Err(lease_error("not_found", lease)),
            Some(o) if o != expert => Err(lease_error("not_owner", lease)),
            _ => match (w, h) {
                (Some(w), Some(h)) if (w, h) != (width, height) => {
                    Err(StoreError::InvalidArgument(format!(
                        "mask is {width}x{height}, the leased image is {w}x{h}"
                    )))
                }
                _ => Ok(()),
            },
        }
    }
}
