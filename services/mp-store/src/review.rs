//! Settling the marks of an image several experts marked (overlap > 1): the images waiting
//! for settlement, the review queue a reviewer leases from, and the settled marks — the only
//! marks of an overlapping project that can become guidance.

use super::*;

/// The default `review_below`: images whose marks agree less (pixel-wise Fleiss' κ) go to a
/// reviewer; the others are merged per pixel by majority. κ 0.4 is the usual lower bound of
/// "moderate" agreement.
pub const DEFAULT_REVIEW_BELOW: f64 = 0.4;

/// A review lease: one image under review, held by one reviewer until `deadline_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewLease {
    pub lease_id: String,
    pub image_id: String,
    pub reviewer: String,
    pub kappa: f64,
    pub deadline_ms: u64,
    /// active, settled or expired.
    pub state: String,
}

/// The result of a settlement: the settled mark and its proposal (empty when the settled
/// mark marks nothing), and whether the image had been settled before (this call changed
/// nothing).
#[derive(Debug, Clone, PartialEq)]
pub struct Settled {
    pub mark_id: String,
    pub proposal_id: String,
    pub duplicate: bool,
}

/// Where the settlement of an overlapping project stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReviewCounts {
    /// Images with all their marks, waiting to be settled or queued for review.
    pub unsettled: u64,
    /// Images waiting for a reviewer.
    pub queued: u64,
    /// Images a reviewer holds now.
    pub leased: u64,
    /// Images settled (automatically or by a reviewer).
    pub settled: u64,
}

impl Store {
    /// The agreement (pixel-wise Fleiss' κ) below which an image's marks go to review.
    pub async fn set_review_below(&self, kappa: f64) -> Result<()> {
        if !(-1.0..=1.0).contains(&kappa) {
            return Err(StoreError::InvalidArgument(format!(
                "review_below is a kappa, -1 to 1, not {kappa}"
            )));
        }
        let mut c = self.conn.clone();
        let _: () = c.set(self.k("review_below"), kappa).await?;
        Ok(())
    }

    pub async fn review_below(&self) -> Result<f64> {
        let mut c = self.conn.clone();
        let v: Option<f64> = c.get(self.k("review_below")).await?;
        Ok(v.filter(|k| k.is_finite()).unwrap_or(DEFAULT_REVIEW_BELOW))
    }

    /// The marks experts made of image `id`, in the order they were stored (settled marks are
    /// not among them).
    pub async fn marks_of_image(&self, id: &str) -> Result<Vec<MarkRecord>> {
        self.marks_in(&format!("marks:image:{id}")).await
    }

    /// Images that have all their marks and are neither settled nor queued for review.
    pub async fn unsettled(&self) -> Result<Vec<String>> {
        let mut c = self.conn.clone();
        let mut v: Vec<String> = c.smembers(self.k("unsettled")).await?;
        v.sort();
        Ok(v)
    }

    /// The settled mark of image `id`, if it was settled.
    pub async fn settled_mark_of(&self, id: &str) -> Result<Option<String>> {
        let mut c = self.conn.clone();
        Ok(c.hget(self.k("settled"), id).await?)
    }

    /// Every settled mark, in settlement order.
    pub async fn settled_marks(&self) -> Result<Vec<MarkRecord>> {
        self.marks_in("settled_marks").await
    }

    pub async fn review_counts(&self) -> Result<ReviewCounts> {
        let mut c = self.conn.clone();
        let (unsettled, queued, leased, settled): (u64, u64, u64, u64) = redis::pipe()
            .scard(self.k("unsettled"))
            .zcard(self.k("review"))
            .zcard(self.k("review:leases"))
            .hlen(self.k("settled"))
            .query_async(&mut c)
            .await?;
        Ok(ReviewCounts {
            unsettled,
            queued,
            leased,
            settled,
        })
    }

    /// The images waiting for review, lowest agreement first, with their κ.
    pub async fn review_queue(&self, limit: usize) -> Result<Vec<(String, f64)>> {
        let mut c = self.conn.clone();
        let end = limit.max(1) as isize - 1;
        Ok(c.zrange_withscores(self.k("review"), 0, end).await?)
    }

    /// Queues image `id`, whose marks agree with κ `kappa`, for review. `false` when it was
    /// queued or settled already.
    pub async fn queue_review(&self, id: &str, kappa: f64) -> Result<bool> {
        let mut c = self.conn.clone();
        let v: Vec<redis::Value> = self
            .scripts
            .queue_review
            .prepare_invoke()
            .arg(&self.prefix)
            .arg(id)
            .arg(if kappa.is_finite() { kappa } else { -1.0 })
            .invoke_async(&mut c)
            .await?;
        Ok(v.first().map(value_string).as_deref() == Some("ok"))
    }

    /// Leases the image with the lowest agreement that `reviewer` did not mark, for `ttl_ms`;
    /// expired review leases go back to the review queue first.
    pub async fn lease_review(&self, reviewer: &str, ttl_ms: u64) -> Result<Option<ReviewLease>> {
        let mut c = self.conn.clone();
        let lid = new_id();
        let v: Vec<redis::Value> = self
            .scripts
            .lease_review
            .prepare_invoke()
            .arg(&self.prefix)
            .arg(&lid)
            .arg(reviewer)
            .arg(ttl_ms)
            .invoke_async(&mut c)
            .await?;
        let words: Vec<String> = v.iter().map(value_string).collect();
        match words.first().map(String::as_str) {
            Some("ok") if words.len() == 4 => Ok(Some(ReviewLease {
                lease_id: lid,
                image_id: words[1].clone(),
                reviewer: reviewer.to_string(),
                kappa: words[2].parse().unwrap_or(f64::NAN),
                deadline_ms: words[3].parse().unwrap_or(0),
                state: "active".into(),
            })),
            Some("empty") => Ok(None),
            other => Err(StoreError::Corrupt(format!(
                "review lease script answered {other:?}"
            ))),
        }
    }

    pub async fn review_lease(&self, lease_id: &str) -> Result<ReviewLease> {
        let mut c = self.conn.clone();
        let h: HashMap<String, Vec<u8>> = c
            .hgetall(self.k(&format!("review:lease:{lease_id}")))
            .await?;
        if h.is_empty() {
            return Err(StoreError::NotFound(format!(
                "review lease {lease_id} does not exist"
            )));
        }
        Ok(ReviewLease {
            lease_id: lease_id.to_string(),
            image_id: text(&h, "image"),
            reviewer: text(&h, "reviewer"),
            kappa: field(&h, "kappa").unwrap_or(f64::NAN),
            deadline_ms: field(&h, "deadline").unwrap_or(0),
            state: text(&h, "state"),
        })
    }

    /// Settles image `image` with the mark `values` (`how`: majority, union, accept:<mark>,
    /// own…; `from`: the marks it settles), once: the settled mark gets a proposal owned by
    /// `owner` with its refine job (none when the mark marks nothing). `review_lease`: the
    /// reviewer's lease (its owner must be `owner`), or `None` for an automatic settlement,
    /// which is refused while the image waits for review.
    #[allow(clippy::too_many_arguments)]
    pub async fn settle(
        &self,
        image: &str,
        owner: &str,
        width: u32,
        height: u32,
        values: &[i8],
        how: &str,
        kappa: f64,
        from: &[String],
        review_lease: Option<&str>,
    ) -> Result<Settled> {
        if values.len() != (width as usize) * (height as usize) {
            return Err(StoreError::InvalidArgument(format!(
                "settled mark: {} values for {width}x{height}",
                values.len()
            )));
        }
        let mut c = self.conn.clone();
        let mark = new_id();
        let prop = if values.iter().any(|&v| v != 0) {
            new_id()
        } else {
            String::new()
        };
        let bytes: Vec<u8> = values.iter().map(|&v| v as u8).collect();
        let lid = review_lease.unwrap_or("");
        let v: Vec<redis::Value> = self
            .scripts
            .settle
            .prepare_invoke()
            .arg(&self.prefix)
            .arg(image)
            .arg(&mark)
            .arg(&prop)
            .arg(owner)
            .arg(width)
            .arg(height)
            .arg(bytes)
            .arg(how)
            .arg(if kappa.is_finite() { kappa } else { -1.0 })
            .arg(from.join(","))
            .arg(lid)
            .invoke_async(&mut c)
            .await?;
        let words: Vec<String> = v.iter().map(value_string).collect();
        match words.first().map(String::as_str) {
            Some(w @ ("ok" | "dup")) if words.len() == 3 => Ok(Settled {
                mark_id: words[1].clone(),
                proposal_id: words[2].clone(),
                duplicate: w == "dup",
            }),
            Some("in_review") => Err(StoreError::FailedPrecondition(format!(
                "image {image} waits for a reviewer"
            ))),
            Some("bad_size") => Err(StoreError::InvalidArgument(format!(
                "settled mark is {width}x{height} but image {image} is {}x{}",
                words.get(1).map(String::as_str).unwrap_or("?"),
                words.get(2).map(String::as_str).unwrap_or("?")
            ))),
            Some("not_owner") => Err(StoreError::PermissionDenied(format!(
                "review lease {lid} belongs to another reviewer"
            ))),
            Some("not_found") => Err(StoreError::NotFound(format!(
                "review lease {lid} does not exist or is not for image {image}"
            ))),
            Some("expired") => Err(StoreError::FailedPrecondition(format!(
                "review lease {lid} expired; the image went back to the review queue"
            ))),
            Some(w @ "settled") => Err(StoreError::FailedPrecondition(format!(
                "review lease {lid} was {w} already"
            ))),
            other => Err(StoreError::Corrupt(format!(
                "settle script answered {other:?}"
            ))),
        }
    }
}
