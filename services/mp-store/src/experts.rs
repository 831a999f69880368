//! Experts, their hashed tokens and roles, who is online and how many marks each made.

use super::*;

impl Store {
    /// Creates an expert; returns (id, token). Only the token's SHA-256 is stored.
    pub async fn create_expert(&self, name: &str, role: Role) -> Result<(String, String)> {
        self.create_expert_until(name, role, None).await
    }

    /// [`Store::create_expert`] with a token that stops working at `expires_ms` (Unix ms).
    pub async fn create_expert_until(
        &self,
        name: &str,
        role: Role,
        expires_ms: Option<u64>,
    ) -> Result<(String, String)> {
        self.create_expert_with(name, role, expires_ms, None, "system")
            .await
    }

    /// [`Store::create_expert_until`] by `by` (an admin's id), for the audit.
    pub async fn create_expert_by(
        &self,
        name: &str,
        role: Role,
        expires_ms: Option<u64>,
        by: &str,
    ) -> Result<(String, String)> {
        self.create_expert_with(name, role, expires_ms, None, by)
            .await
    }

    /// [`Store::create_expert`] with a token chosen by the operator (an admin token kept in
    /// a Kubernetes Secret, say): at least 32 characters, and not one already in use.
    pub async fn create_expert_with_token(
        &self,
        name: &str,
        role: Role,
        token: &str,
    ) -> Result<String> {
        if token.len() < 32 || token.len() > 256 || token.chars().any(|c| c.is_whitespace()) {
            return Err(StoreError::InvalidArgument(
                "a token must hold 32 to 256 characters and no spaces".into(),
            ));
        }
        let mut c = self.conn.clone();
        let used: bool = c
            .exists(self.k(&format!("token:{}", hash_token(token))))
            .await?;
        if used {
            return Err(StoreError::FailedPrecondition(
                "that token is already some expert's".into(),
            ));
        }
        Ok(self
            .create_expert_with(name, role, None, Some(token), "operator")
            .await?
            .0)
    }

    async fn create_expert_with(
        &self,
        name: &str,
        role: Role,
        expires_ms: Option<u64>,
        token: Option<&str>,
        by: &str,
    ) -> Result<(String, String)> {
        if name.trim().is_empty() || name.len() > 100 {
            return Err(StoreError::InvalidArgument(
                "expert name must hold 1 to 100 characters".into(),
            ));
        }
        let id = new_id()[..12].to_string();
        let token = token
            .map(str::to_string)
            .unwrap_or_else(|| format!("mp_{}{}", new_id(), new_id()));
        let mut fields = vec![
            ("name", name.to_string()),
            ("role", role.as_str().to_string()),
            ("created_ms", now_ms().to_string()),
        ];
        if let Some(t) = expires_ms {
            fields.push(("expires_ms", t.to_string()));
        }
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset_multiple(self.k(&format!("expert:{id}")), &fields)
            .ignore()
            .set(self.k(&format!("token:{}", hash_token(&token))), &id)
            .ignore()
            .sadd(self.k("experts"), &id)
            .ignore();
        self.audit_in(
            &mut pipe,
            "token_created",
            by,
            &[
                ("expert", id.as_str()),
                ("name", name),
                ("role", role.as_str()),
            ],
        );
        let _: () = pipe.query_async(&mut c).await?;
        Ok((id, token))
    }

    pub async fn expert(&self, id: &str) -> Result<Expert> {
        let mut c = self.conn.clone();
        let h: HashMap<String, Vec<u8>> = c.hgetall(self.k(&format!("expert:{id}"))).await?;
        if h.is_empty() {
            return Err(StoreError::NotFound(format!("expert {id} does not exist")));
        }
        let ms = |k: &str| text(&h, k).parse::<u64>().ok();
        Ok(Expert {
            id: id.to_string(),
            name: text(&h, "name"),
            role: text(&h, "role").parse()?,
            created_ms: ms("created_ms").unwrap_or(0),
            expires_ms: ms("expires_ms"),
            revoked_ms: ms("revoked_ms"),
        })
    }

    /// Every expert, by creation time.
    pub async fn experts(&self) -> Result<Vec<Expert>> {
        let mut out = Vec::new();
        for id in self.members("experts").await? {
            match self.expert(&id).await {
                Ok(e) => out.push(e),
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        Ok(out)
    }

    /// Refuses `id`'s token from now on: the expert is marked revoked (its marks and proposals
    /// stay; its token then answers "token revoked"), and every gateway is told on
    /// `P:auth:revoked` to drop what it cached.
    /// Every expert's name by id.
    pub async fn expert_names(&self) -> Result<HashMap<String, String>> {
        Ok(self
            .experts()
            .await?
            .into_iter()
            .map(|e| (e.id, e.name))
            .collect())
    }

    pub async fn revoke_expert(&self, id: &str) -> Result<()> {
        self.revoke_expert_by(id, "system").await
    }

    /// [`Store::revoke_expert`] by `by` (an admin's id), for the audit.
    pub async fn revoke_expert_by(&self, id: &str, by: &str) -> Result<()> {
        let e = self.expert(id).await?;
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset(self.k(&format!("expert:{id}")), "revoked_ms", now_ms())
            .ignore()
            .publish(self.k("auth:revoked"), &e.id)
            .ignore();
        self.audit_in(
            &mut pipe,
            "token_revoked",
            by,
            &[("expert", id), ("name", e.name.as_str())],
        );
        let _: () = pipe.query_async(&mut c).await?;
        Ok(())
    }

    /// The ids announced by [`Store::revoke_expert`], on a connection of its own; the stream
    /// ends when that connection is lost.
    pub async fn revocations(
        &self,
    ) -> Result<impl futures::Stream<Item = String> + Send + 'static> {
        use futures::StreamExt;
        let mut sub = self.client.get_async_pubsub().await?;
        sub.subscribe(self.k("auth:revoked")).await?;
        Ok(sub
            .into_on_message()
            .filter_map(|m| async move { m.get_payload::<String>().ok() }))
    }

    /// The expert a bearer token belongs to, unless the token expired or was revoked.
    pub async fn authenticate(&self, token: &str) -> Result<Expert> {
        if token.is_empty() || token.len() > 200 {
            return Err(StoreError::Unauthenticated(
                "missing or malformed token".into(),
            ));
        }
        let mut c = self.conn.clone();
        let id: Option<String> = c
            .get(self.k(&format!("token:{}", hash_token(token))))
            .await?;
        let id = id.ok_or_else(|| StoreError::Unauthenticated("unknown token".into()))?;
        let e = self.expert(&id).await?;
        if e.revoked_ms.is_some() {
            return Err(StoreError::Unauthenticated("token revoked".into()));
        }
        if e.expires_ms.is_some_and(|t| now_ms() >= t) {
            return Err(StoreError::Unauthenticated("token expired".into()));
        }
        Ok(e)
    }

    pub async fn touch_online(&self, expert: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let _: () = c.zadd(self.k("online"), expert, now_ms()).await?;
        Ok(())
    }

    /// Expert id → marks, for every expert with marks (one read, no names).
    pub async fn marks_counts(&self) -> Result<HashMap<String, u64>> {
        let mut c = self.conn.clone();
        Ok(c.hgetall(self.k("marks_per_expert")).await?)
    }

    /// (expert id, name, marks) for every expert with marks.
    pub async fn marks_per_expert(&self) -> Result<Vec<(String, String, u64)>> {
        let mut out = Vec::new();
        for (id, n) in self.marks_counts().await? {
            let name = self.expert(&id).await.map(|e| e.name).unwrap_or_default();
            out.push((id, name, n));
        }
        out.sort();
        Ok(out)
    }
}
