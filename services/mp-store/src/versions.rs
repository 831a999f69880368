//! Model versions: current, serving (frozen for a round), history, rollback, the end of a round.

use super::*;

impl Store {
    pub async fn current_version(&self) -> Result<u64> {
        let mut c = self.conn.clone();
        let v: Option<u64> = c.get(self.k("model:current")).await?;
        Ok(v.unwrap_or(0))
    }

    /// The version frozen for the current round: leases, scores and image views use it.
    /// Falls back to the current version.
    pub async fn serving_version(&self) -> Result<u64> {
        let mut c = self.conn.clone();
        let v: Option<u64> = c.get(self.k("model:serving")).await?;
        match v {
            Some(v) => Ok(v),
            None => self.current_version().await,
        }
    }

    /// Starts a round on `version`.
    pub async fn set_serving_version(&self, version: u64) -> Result<()> {
        let mut c = self.conn.clone();
        let _: () = c.set(self.k("model:serving"), version).await?;
        Ok(())
    }

    /// Makes an existing version current and serving (rollback).
    pub async fn rollback(&self, version: u64) -> Result<()> {
        self.version(version).await?;
        let mut c = self.conn.clone();
        let _: () = redis::pipe()
            .atomic()
            .set(self.k("model:current"), version)
            .ignore()
            .set(self.k("model:serving"), version)
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Asks the trainer to end the intervention round.
    pub async fn request_round_end(&self) -> Result<()> {
        let mut c = self.conn.clone();
        let _: () = c.set(self.k("round:end"), now_ms()).await?;
        Ok(())
    }

    /// Records a version and makes it current.
    pub async fn publish_version(&self, rec: &ModelVersionRecord) -> Result<()> {
        let mut c = self.conn.clone();
        let json = serde_json::to_string(rec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset(self.k("model:versions"), rec.version, json)
            .ignore()
            .set(self.k("model:current"), rec.version)
            .ignore();
        let _: () = pipe.query_async(&mut c).await?;
        Ok(())
    }

    /// The highest version number published (0 before any).
    pub async fn newest_version(&self) -> Result<u64> {
        let mut c = self.conn.clone();
        let keys: Vec<u64> = c.hkeys(self.k("model:versions")).await?;
        Ok(keys.into_iter().max().unwrap_or(0))
    }

    pub async fn versions(&self) -> Result<Vec<ModelVersionRecord>> {
        let mut c = self.conn.clone();
        let h: HashMap<u64, String> = c.hgetall(self.k("model:versions")).await?;
        let mut v: Vec<ModelVersionRecord> =
            h.into_values().map(|s| decode(&s)).collect::<Result<_>>()?;
        v.sort_by_key(|r| r.version);
        Ok(v)
    }

    pub async fn version(&self, version: u64) -> Result<ModelVersionRecord> {
        let mut c = self.conn.clone();
        let s: Option<String> = c.hget(self.k("model:versions"), version).await?;
        let s = s.ok_or_else(|| {
            StoreError::NotFound(format!("model version {version} does not exist"))
        })?;
        decode(&s)
    }
}

fn decode(s: &str) -> Result<ModelVersionRecord> {
    serde_json::from_str(s).map_err(|e| {
        let head: String = s.chars().take(200).collect();
        StoreError::Corrupt(format!("model version: {e} in {head}"))
    })
}
