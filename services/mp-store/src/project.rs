//! The project: its description, the images of every split.

use super::*;

impl Store {
    pub async fn set_project(&self, info: &ProjectInfo) -> Result<()> {
        let mut c = self.conn.clone();
        let json = serde_json::to_string(info).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let _: () = c.set(self.k("project"), json).await?;
        Ok(())
    }

    pub async fn project(&self) -> Result<Option<ProjectInfo>> {
        let mut c = self.conn.clone();
        let v: Option<String> = c.get(self.k("project")).await?;
        v.map(|s| {
            serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(format!("project: {e}")))
        })
        .transpose()
    }

    /// Stores training images (the ones that can be queued) in pipelined batches.
    pub async fn put_images(&self, images: &[ImageRecord]) -> Result<()> {
        self.put_split(images, "images").await
    }

    /// Stores images of a held-out split (`val`, `test`): never queued, used by workers and
    /// the trainer for the validation guard and for reporting.
    pub async fn put_held_out(&self, split: &str, images: &[ImageRecord]) -> Result<()> {
        self.put_split(images, &format!("split:{split}")).await
    }

    async fn put_split(&self, images: &[ImageRecord], set: &str) -> Result<()> {
        let mut c = self.conn.clone();
        for chunk in images.chunks(500) {
            let mut pipe = redis::pipe();
            for im in chunk {
                pipe.hset_multiple(
                    self.k(&format!("img:{}", im.id)),
                    &[
                        ("name", im.name.as_bytes().to_vec()),
                        ("label", im.label.to_string().into_bytes()),
                        ("width", im.width.to_string().into_bytes()),
                        ("height", im.height.to_string().into_bytes()),
                        ("channels", im.channels.to_string().into_bytes()),
                        ("pixels", im.pixels.clone()),
                    ],
                )
                .ignore();
                pipe.sadd(self.k(set), &im.id).ignore();
            }
            let _: () = pipe.query_async(&mut c).await?;
        }
        Ok(())
    }

    pub async fn image(&self, id: &str) -> Result<ImageRecord> {
        let mut c = self.conn.clone();
        let h: HashMap<String, Vec<u8>> = c.hgetall(self.k(&format!("img:{id}"))).await?;
        if h.is_empty() {
            return Err(StoreError::NotFound(format!("image {id:?} does not exist")));
        }
        image_from_hash(id, &h)
    }

    pub async fn image_ids(&self) -> Result<Vec<String>> {
        self.members("images").await
    }

    /// Ids of a held-out split, sorted.
    pub async fn held_out_ids(&self, split: &str) -> Result<Vec<String>> {
        self.members(&format!("split:{split}")).await
    }

    async fn members(&self, set: &str) -> Result<Vec<String>> {
        let mut c = self.conn.clone();
        let mut v: Vec<String> = c.smembers(self.k(set)).await?;
        v.sort();
        Ok(v)
    }

    /// Many images at once (pipelined); unknown ids are an error.
    pub async fn images(&self, ids: &[String]) -> Result<Vec<ImageRecord>> {
        let mut out = Vec::with_capacity(ids.len());
        let mut c = self.conn.clone();
        for chunk in ids.chunks(500) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.hgetall(self.k(&format!("img:{id}")));
            }
            let hs: Vec<HashMap<String, Vec<u8>>> = pipe.query_async(&mut c).await?;
            for (id, h) in chunk.iter().zip(hs) {
                if h.is_empty() {
                    return Err(StoreError::NotFound(format!("image {id:?} does not exist")));
                }
                out.push(image_from_hash(id, &h)?);
            }
        }
        Ok(out)
    }
}
