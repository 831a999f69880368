//! Stored marks, the guidance set (committed marks) and the suggested marks of each model version.

use super::*;

impl Store {
    pub async fn mark(&self, id: &str) -> Result<MarkRecord> {
        let mut c = self.conn.clone();
        let h: HashMap<String, Vec<u8>> = c.hgetall(self.k(&format!("mark:{id}"))).await?;
        if h.is_empty() {
            return Err(StoreError::NotFound(format!("mark {id} does not exist")));
        }
        Ok(MarkRecord {
            id: id.to_string(),
            image_id: text(&h, "image"),
            expert_id: text(&h, "expert"),
            time_ms: field(&h, "time_ms")?,
            model_version: field(&h, "model_version")?,
            width: field(&h, "width")?,
            height: field(&h, "height")?,
            values: h
                .get("mask")
                .map(|b| b.iter().map(|&x| x as i8).collect())
                .unwrap_or_default(),
            idempotency_key: text(&h, "idempotency_key"),
            proposal_id: text(&h, "proposal"),
        })
    }

    /// Every mark id, in the order marks were stored.
    pub async fn mark_ids(&self) -> Result<Vec<String>> {
        let mut c = self.conn.clone();
        Ok(c.lrange(self.k("marks"), 0, -1).await?)
    }

    /// The marks of every training image that has at least `min` of them (with overlap,
    /// the images several experts marked), image by image.
    pub async fn marks_of_images_with(&self, min: usize) -> Result<Vec<MarkRecord>> {
        let ids = self.image_ids().await?;
        let mut c = self.conn.clone();
        let mut out = Vec::new();
        for chunk in ids.chunks(1000) {
            let mut p = redis::pipe();
            for id in chunk {
                p.llen(self.k(&format!("marks:image:{id}")));
            }
            let lens: Vec<usize> = p.query_async(&mut c).await?;
            for (id, n) in chunk.iter().zip(lens) {
                if n >= min.max(1) {
                    out.extend(self.marks_of_image(id).await?);
                }
            }
        }
        Ok(out)
    }

    /// Stores a mark made elsewhere (`mp import marks`, from `source`): no lease, no
    /// proposal. `Ok(None)` when the expert has marked the image already (the import is
    /// deduplicated by image and expert), else the new mark's id.
    pub async fn import_mark(&self, m: &MarkRecord, source: &str) -> Result<Option<String>> {
        if m.values.len() != (m.width as usize) * (m.height as usize) {
            return Err(StoreError::InvalidArgument(format!(
                "mark of {}: {} values for {}x{}",
                m.image_id,
                m.values.len(),
                m.width,
                m.height
            )));
        }
        let mut c = self.conn.clone();
        let id = new_id();
        let bytes: Vec<u8> = m.values.iter().map(|&v| v as u8).collect();
        let v: Vec<redis::Value> = self
            .scripts
            .import_mark
            .prepare_invoke()
            .arg(&self.prefix)
            .arg(&id)
            .arg(&m.image_id)
            .arg(&m.expert_id)
            .arg(m.time_ms)
            .arg(m.model_version)
            .arg(m.width)
            .arg(m.height)
            .arg(bytes)
            .arg(source)
            .invoke_async(&mut c)
            .await?;
        let words: Vec<String> = v.iter().map(value_string).collect();
        match words.first().map(String::as_str) {
            Some("ok") => Ok(Some(id)),
            Some("dup") => Ok(None),
            Some("not_found") => Err(StoreError::NotFound(format!(
                "image {} does not exist",
                m.image_id
            ))),
            Some("bad_size") => Err(StoreError::InvalidArgument(format!(
                "mark of {} is {}x{}, the image {}x{}",
                m.image_id,
                m.width,
                m.height,
                words.get(1).map(String::as_str).unwrap_or("?"),
                words.get(2).map(String::as_str).unwrap_or("?")
            ))),
            other => Err(StoreError::Corrupt(format!(
                "import script answered {other:?}"
            ))),
        }
    }

    /// The marks whose ids the list `P:{list}` holds, in its order.
    pub(crate) async fn marks_in(&self, list: &str) -> Result<Vec<MarkRecord>> {
        let mut c = self.conn.clone();
        let ids: Vec<String> = c.lrange(self.k(list), 0, -1).await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.mark(&id).await?);
        }
        Ok(out)
    }

    /// Every mark, in the order they were stored.
    pub async fn all_marks(&self) -> Result<Vec<MarkRecord>> {
        self.marks_in("marks").await
    }

    /// Adds a committed mark to the guidance set (once).
    pub async fn add_guidance(&self, mark_id: &str) -> Result<bool> {
        let mut c = self.conn.clone();
        let added: u64 = c.sadd(self.k("guidance:set"), mark_id).await?;
        if added == 1 {
            let _: () = c.rpush(self.k("guidance"), mark_id).await?;
        }
        Ok(added == 1)
    }

    /// Committed marks, in commit order.
    pub async fn guidance_marks(&self) -> Result<Vec<MarkRecord>> {
        self.marks_in("guidance").await
    }

    /// Stores the suggested marks of images under a model version (overwriting older ones),
    /// each kept `SUGGESTION_TTL_S`.
    pub async fn put_suggestions(
        &self,
        version: u64,
        items: &[(String, Suggestion)],
    ) -> Result<()> {
        let mut pipe = redis::pipe();
        for (image, s) in items {
            let bytes = s.encode();
            pipe.set_ex(
                self.k(&format!("suggest:{version}:{image}")),
                &bytes,
                SUGGESTION_TTL_S,
            )
            .ignore();
            // Suggestions come from the images and the committed marks, not from the model:
            // the newest one also serves leases of versions that were never scored.
            pipe.set_ex(
                self.k(&format!("suggest:last:{image}")),
                bytes,
                SUGGESTION_TTL_S,
            )
            .ignore();
        }
        let mut c = self.conn.clone();
        let _: () = pipe.query_async(&mut c).await?;
        Ok(())
    }

    /// The suggested mark of an image under a model version, else the newest one computed
    /// for the image under any version (a mid-round commit publishes versions that scoring
    /// never saw), if any.
    pub async fn suggestion(&self, version: u64, image: &str) -> Result<Option<Suggestion>> {
        let mut c = self.conn.clone();
        let (exact, last): (Option<Vec<u8>>, Option<Vec<u8>>) = redis::pipe()
            .get(self.k(&format!("suggest:{version}:{image}")))
            .get(self.k(&format!("suggest:last:{image}")))
            .query_async(&mut c)
            .await?;
        exact.or(last).map(|b| Suggestion::decode(&b)).transpose()
    }
}

/// How long a suggestion is kept (a round rarely lasts longer; scoring writes it again).
pub const SUGGESTION_TTL_S: u64 = 24 * 3600;

/// A suggested mark: per pixel a signed confidence (+1..=+127 red, −1..=−127 green, 0
/// nothing), the mode that suggested it and how many committed marks it learnt from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suggestion {
    pub mode: String,
    pub marks: u32,
    pub values: Vec<i8>,
}

impl Suggestion {
    /// `mode length (u8), mode, marks (u32 LE)`, then runs of `value (i8), length (LEB128)`.
    pub fn encode(&self) -> Vec<u8> {
        let mode = &self.mode.as_bytes()[..self.mode.len().min(255)];
        let mut out = Vec::with_capacity(8 + mode.len() + 16);
        out.push(mode.len() as u8);
        out.extend_from_slice(mode);
        out.extend_from_slice(&self.marks.to_le_bytes());
        let mut i = 0;
        while i < self.values.len() {
            let v = self.values[i];
            let mut n = 1u64;
            while i + (n as usize) < self.values.len() && self.values[i + n as usize] == v {
                n += 1;
            }
            out.push(v as u8);
            let mut rest = n;
            loop {
                let byte = (rest & 0x7f) as u8;
                rest >>= 7;
                if rest == 0 {
                    out.push(byte);
                    break;
                }
                out.push(byte | 0x80);
            }
            i += n as usize;
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Suggestion> {
        let bad = |what: &str| StoreError::Corrupt(format!("suggestion: {what}"));
        let n = *b.first().ok_or_else(|| bad("empty"))? as usize;
        if b.len() < 1 + n + 4 {
            return Err(bad("short header"));
        }
        let mode = String::from_utf8(b[1..1 + n].to_vec()).map_err(|_| bad("mode"))?;
        let marks = u32::from_le_bytes(b[1 + n..5 + n].try_into().map_err(|_| bad("marks"))?);
        let mut values = Vec::new();
        let mut i = 5 + n;
        while i < b.len() {
            let v = b[i] as i8;
            i += 1;
            let (mut run, mut shift) = (0u64, 0u32);
            loop {
                let byte = *b.get(i).ok_or_else(|| bad("truncated run"))?;
                i += 1;
                if shift > 35 {
                    return Err(bad("run too long"));
                }
                run |= u64::from(byte & 0x7f) << shift;
                shift += 7;
                if byte & 0x80 == 0 {
                    break;
                }
            }
            if values.len() as u64 + run > 64 * 1024 * 1024 {
                return Err(bad("more than 64 Mi pixels"));
            }
            values.extend(std::iter::repeat_n(v, run as usize));
        }
        Ok(Suggestion {
            mode,
            marks,
            values,
        })
    }
}
