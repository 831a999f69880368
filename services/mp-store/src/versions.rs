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
        self.rollback_by(version, "system").await
    }

    /// [`Store::rollback`] by `by` (an admin's id), for the audit.
    pub async fn rollback_by(&self, version: u64, by: &str) -> Result<()> {
        let to = self.version(version).await?;
        let from = self.current_version().await?;
        let acc_before = self
            .version(from)
            .await
            .map(|r| r.val_accuracy.to_string())
            .unwrap_or_default();
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .set(self.k("model:current"), version)
            .ignore()
            .set(self.k("model:serving"), version)
            .ignore();
        let (f, v, acc_after) = (
            from.to_string(),
            version.to_string(),
            to.val_accuracy.to_string(),
        );
        self.audit_in(
            &mut pipe,
            "rollback",
            by,
            &[
                ("version_before", f.as_str()),
                ("version_after", v.as_str()),
                ("accuracy_before", acc_before.as_str()),
                ("accuracy_after", acc_after.as_str()),
            ],
        );
        let _: () = pipe.query_async(&mut c).await?;
        Ok(())
    }

    /// Asks the trainer to end the intervention round.
    pub async fn request_round_end(&self) -> Result<()> {
        self.request_round_end_by("system").await
    }

    /// [`Store::request_round_end`] by `by` (an admin's id), for the audit.
    pub async fn request_round_end_by(&self, by: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic().set(self.k("round:end"), now_ms()).ignore();
        self.audit_in(&mut pipe, "round_end_requested", by, &[]);
        let _: () = pipe.query_async(&mut c).await?;
        Ok(())
    }

    /// Records a version and makes it current, only on top of its parent: when
    /// `model:current` is no longer `rec.parent` (a rollback, another trainer) the version is
    /// refused with [`StoreError::Aborted`] and nothing is written.
    pub async fn publish_version(&self, rec: &ModelVersionRecord) -> Result<()> {
        self.publish(rec, None).await.map(|_| ())
    }

    /// Publishes the version that applies proposal `pid` and marks the proposal `committed`
    /// (with `fields`) and its mark part of the guidance, all in one step. `Ok(Some(v))`: the
    /// proposal was already committed, as version v (a redelivered commit job): nothing is
    /// written.
    pub async fn publish_commit(
        &self,
        rec: &ModelVersionRecord,
        pid: &str,
        fields: &[(&str, String)],
    ) -> Result<Option<u64>> {
        self.publish(rec, Some((pid, fields))).await
    }

    async fn publish(
        &self,
        rec: &ModelVersionRecord,
        commit: Option<(&str, &[(&str, String)])>,
    ) -> Result<Option<u64>> {
        check_relative_file(&rec.file)?;
        let mut c = self.conn.clone();
        let json = serde_json::to_string(rec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut inv = self.scripts.publish.prepare_invoke();
        inv.arg(&self.prefix)
            .arg(rec.version)
            .arg(rec.parent)
            .arg(json);
        if let Some((pid, fields)) = commit {
            inv.arg(pid);
            for (k, v) in fields {
                inv.arg(*k).arg(v);
            }
        }
        let v: Vec<redis::Value> = inv.invoke_async(&mut c).await?;
        let words: Vec<String> = v.iter().map(value_string).collect();
        let second = || words.get(1).cloned().unwrap_or_default();
        match words.first().map(String::as_str) {
            Some("ok") => Ok(None),
            Some("committed") => Ok(Some(second().parse().unwrap_or(0))),
            Some("exists") => Err(StoreError::Aborted(format!(
                "model version {} already exists",
                rec.version
            ))),
            Some("moved") => Err(StoreError::Aborted(format!(
                "version {} was built on v{} but the current version is now v{}",
                rec.version,
                rec.parent,
                second()
            ))),
            Some("not_committing") => Err(StoreError::FailedPrecondition(format!(
                "proposal {} is {}, not committing",
                commit.map(|c| c.0).unwrap_or_default(),
                second()
            ))),
            other => Err(StoreError::Corrupt(format!(
                "publish script answered {other:?}"
            ))),
        }
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
    let rec: ModelVersionRecord = serde_json::from_str(s).map_err(|e| {
        let head: String = s.chars().take(200).collect();
        StoreError::Corrupt(format!("model version: {e} in {head}"))
    })?;
    check_relative_file(&rec.file)
        .map_err(|e| StoreError::Corrupt(format!("model version {}: {e}", rec.version)))?;
    Ok(rec)
}
