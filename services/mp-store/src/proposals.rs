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
}
