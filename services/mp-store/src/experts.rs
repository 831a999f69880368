//! Experts, their hashed tokens and roles, who is online and how many marks each made.

use super::*;

impl Store {
    /// Creates an expert; returns (id, token). Only the token's SHA-256 is stored.
    pub async fn create_expert(&self, name: &str, role: Role) -> Result<(String, String)> {
        if name.trim().is_empty() || name.len() > 100 {
            return Err(StoreError::InvalidArgument(
                "expert name must hold 1 to 100 characters".into(),
            ));
        }
        let id = new_id()[..12].to_string();
        let token = format!("mp_{}{}", new_id(), new_id());
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset_multiple(
                self.k(&format!("expert:{id}")),
                &[
                    ("name", name),
                    ("role", role.as_str()),
                    ("created_ms", &now_ms().to_string()),
                ],
            )
            .ignore()
            .set(self.k(&format!("token:{}", hash_token(&token))), &id)
            .ignore()
            .sadd(self.k("experts"), &id)
            .ignore();
        let _: () = pipe.query_async(&mut c).await?;
        Ok((id, token))
    }

    pub async fn expert(&self, id: &str) -> Result<Expert> {
        let mut c = self.conn.clone();
        let h: HashMap<String, Vec<u8>> = c.hgetall(self.k(&format!("expert:{id}"))).await?;
        if h.is_empty() {
            return Err(StoreError::NotFound(format!("expert {id} does not exist")));
        }
        Ok(Expert {
            id: id.to_string(),
            name: text(&h, "name"),
            role: text(&h, "role").parse()?,
        })
    }

    /// The expert a bearer token belongs to.
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
        self.expert(&id).await
    }

    pub async fn touch_online(&self, expert: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let _: () = c.zadd(self.k("online"), expert, now_ms()).await?;
        Ok(())
    }

    /// (expert id, name, marks) for every expert with marks.
    pub async fn marks_per_expert(&self) -> Result<Vec<(String, String, u64)>> {
        let mut c = self.conn.clone();
        let h: HashMap<String, u64> = c.hgetall(self.k("marks_per_expert")).await?;
        let mut out = Vec::new();
        for (id, n) in h {
            let name = self.expert(&id).await.map(|e| e.name).unwrap_or_default();
            out.push((id, name, n));
        }
        out.sort();
        Ok(out)
    }
}
