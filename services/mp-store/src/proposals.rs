//! Refinement proposals and their status.

use super::*;

impl Store {
    pub async fn proposal(&self, id: &str) -> Result<ProposalRecord> {
        let mut c = self.conn.clone();
        let h: HashMap<String, Vec<u8>> = c.hgetall(self.k(&format!("proposal:{id}"))).await?;
        if h.is_empty() {
            return Err(StoreError::NotFound(format!(
                "proposal {id} does not exist"
            )));
        }
        Ok(ProposalRecord {
            id: id.to_string(),
            status: text(&h, "status"),
            mark_id: text(&h, "mark"),
            image_id: text(&h, "image"),
            expert_id: text(&h, "expert"),
            base_version: field(&h, "base_version").unwrap_or(0),
            committed_version: field(&h, "committed_version").unwrap_or(0),
            message: text(&h, "message"),
            result: h
                .get("result")
                .map(|b| String::from_utf8_lossy(b).into_owned()),
            updated_ms: field(&h, "updated_ms").unwrap_or(0),
            provisional: text(&h, "provisional") == "1",
            settled: text(&h, "settled") == "1",
        })
    }

    /// Sets a proposal's status and extra fields (e.g. `result`, `message`).
    pub async fn update_proposal(
        &self,
        id: &str,
        status: &str,
        fields: &[(&str, String)],
    ) -> Result<()> {
        let mut c = self.conn.clone();
        let key = self.k(&format!("proposal:{id}"));
        let exists: bool = c.exists(&key).await?;
        if !exists {
            return Err(StoreError::NotFound(format!(
                "proposal {id} does not exist"
            )));
        }
        let mut items: Vec<(&str, String)> = vec![
            ("status", status.to_string()),
            ("updated_ms", now_ms().to_string()),
        ];
        items.extend(fields.iter().cloned());
        let _: () = c.hset_multiple(&key, &items).await?;
        Ok(())
    }

    /// Commits (`commit` true: the proposal becomes `committing` and its commit job is queued)
    /// or rejects a `ready` proposal, atomically. Returns the new status.
    pub async fn decide(&self, id: &str, decider: &str, commit: bool) -> Result<String> {
        let mut c = self.conn.clone();
        let v: Vec<redis::Value> = self
            .scripts
            .decide
            .prepare_invoke()
            .arg(&self.prefix)
            .arg(id)
            .arg(decider)
            .arg(if commit { "commit" } else { "reject" })
            .invoke_async(&mut c)
            .await?;
        let words: Vec<String> = v.iter().map(value_string).collect();
        match words.first().map(String::as_str) {
            Some("ok") => Ok(words.get(1).cloned().unwrap_or_default()),
            Some("not_found") => Err(StoreError::NotFound(format!(
                "proposal {id} does not exist"
            ))),
            Some("not_ready") => Err(StoreError::FailedPrecondition(format!(
                "proposal {id} is {}, not ready",
                words.get(1).map(String::as_str).unwrap_or("?")
            ))),
            other => Err(StoreError::Corrupt(format!(
                "decide script answered {other:?}"
            ))),
        }
    }
}
