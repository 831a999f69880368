//! The project: its description, the images of every split (metadata in Redis, pixels in
//! the [`ImageStore`]).

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

    /// Overlap: how many different experts mark each image (1, the default: one). Each
    /// of them gets the image in turn, blind (never while another holds it, never twice).
    pub async fn set_overlap(&self, n: u32) -> Result<()> {
        if !(1..=MAX_OVERLAP).contains(&n) {
            return Err(StoreError::InvalidArgument(format!(
                "overlap must be 1 to {MAX_OVERLAP}, not {n}"
            )));
        }
        let mut c = self.conn.clone();
        let _: () = c.set(self.k("overlap"), n).await?;
        Ok(())
    }

    pub async fn overlap(&self) -> Result<u32> {
        let mut c = self.conn.clone();
        let v: Option<u32> = c.get(self.k("overlap")).await?;
        Ok(v.unwrap_or(1).max(1))
    }

    /// How many marks image `id` has.
    pub async fn marks_on_image(&self, id: &str) -> Result<u64> {
        let mut c = self.conn.clone();
        Ok(c.llen(self.k(&format!("marks:image:{id}"))).await?)
    }

    /// Whether image `id` must be marked blind: the project has overlap > 1 and someone
    /// has marked the image already. One round trip.
    pub async fn marked_by_others(&self, id: &str) -> Result<bool> {
        let mut c = self.conn.clone();
        let (overlap, marks): (Option<u32>, u64) = redis::pipe()
            .get(self.k("overlap"))
            .llen(self.k(&format!("marks:image:{id}")))
            .query_async(&mut c)
            .await?;
        Ok(overlap.unwrap_or(1) > 1 && marks > 0)
    }

    /// Deletes every key of the project (everything under `prefix:`), for `project init
    /// --force`. The pixels in the image store are left where they are: a new init writes
    /// over the same object names. Returns how many keys went.
    pub async fn delete_project(&self) -> Result<u64> {
        let mut c = self.conn.clone();
        let pattern = format!("{}:*", self.prefix);
        let mut cursor: u64 = 0;
        let mut n = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await?;
            if !keys.is_empty() {
                let gone: u64 = redis::cmd("UNLINK").arg(&keys).query_async(&mut c).await?;
                n += gone;
            }
            if next == 0 {
                return Ok(n);
            }
            cursor = next;
        }
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

    /// Opens the image store this handle reads pixels from, unless one is set already.
    pub fn with_image_store(self, images: ImageStore) -> Store {
        let _ = self.images.set(std::sync::Arc::new(images));
        self
    }

    /// The project's image store: the one set with [`Store::with_image_store`], else the URL
    /// in `MP_IMAGE_STORE`, else the one the project records, opened once per handle (and its
    /// clones) with the cache bound of [`images::cache_bytes_from_env`].
    pub async fn image_store(&self) -> Result<&ImageStore> {
        let s = self
            .images
            .get_or_try_init(|| async {
                let url = match std::env::var("MP_IMAGE_STORE") {
                    Ok(u) if !u.is_empty() => u,
                    _ => self
                        .project()
                        .await?
                        .map(|p| p.image_store)
                        .unwrap_or_default(),
                };
                if url.is_empty() {
                    return Err(StoreError::FailedPrecondition(
                        "the project names no image store (run `mp project init` first)".into(),
                    ));
                }
                let cache = images::cache_bytes_from_env();
                Ok(std::sync::Arc::new(ImageStore::open(&url, cache)?))
            })
            .await?;
        Ok(s)
    }

    /// Writes the pixels to the image store, then the metadata (no pixels) to Redis, 500
    /// images per pipeline: an id Redis knows always has its pixels stored.
    async fn put_split(&self, images: &[ImageRecord], set: &str) -> Result<()> {
        let store = self.image_store().await?;
        let mut c = self.conn.clone();
        for chunk in images.chunks(500) {
            let blobs: Vec<(&str, Shape, &[u8])> = chunk
                .iter()
                .map(|im| (im.id.as_str(), shape_of(im), im.pixels.as_slice()))
                .collect();
            store.put_many(&blobs).await?;
            let mut pipe = redis::pipe();
            for im in chunk {
                pipe.hset_multiple(
                    self.k(&format!("img:{}", im.id)),
                    &[
                        ("name", im.name.clone()),
                        ("label", im.label.to_string()),
                        ("width", im.width.to_string()),
                        ("height", im.height.to_string()),
                        ("channels", im.channels.to_string()),
                    ],
                )
                .ignore();
                pipe.sadd(self.k(set), &im.id).ignore();
            }
            let _: () = pipe.query_async(&mut c).await?;
        }
        Ok(())
    }

    /// Takes images' metadata back out of Redis (a refused `project init` removes what it
    /// stored before it found a bad file); their pixels stay in the image store, unreferenced.
    pub async fn forget_images(&self, ids: &[String]) -> Result<()> {
        let mut c = self.conn.clone();
        for chunk in ids.chunks(500) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.del(self.k(&format!("img:{id}"))).ignore();
            }
            for set in ["images", "split:val", "split:test"] {
                pipe.srem(self.k(set), chunk).ignore();
            }
            let _: () = pipe.query_async(&mut c).await?;
        }
        Ok(())
    }

    /// One image's metadata (no pixels).
    pub async fn image_meta(&self, id: &str) -> Result<ImageRecord> {
        let mut c = self.conn.clone();
        let h: HashMap<String, Vec<u8>> = c.hgetall(self.k(&format!("img:{id}"))).await?;
        if h.is_empty() {
            return Err(StoreError::NotFound(format!("image {id:?} does not exist")));
        }
        image_from_hash(id, &h)
    }

    /// One image with its pixels.
    pub async fn image(&self, id: &str) -> Result<ImageRecord> {
        let mut im = self.image_meta(id).await?;
        let px = self.image_store().await?.get(id, shape_of(&im)).await?;
        im.pixels = px.to_vec();
        Ok(im)
    }

    /// Records that an image could not be read (the newest reason wins), for the admins, and
    /// takes it out of the queue so that no expert is sent to it.
    pub async fn report_bad_image(&self, id: &str, reason: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let _: () = redis::pipe()
            .atomic()
            .hset(self.k("images:bad"), id, reason)
            .ignore()
            .zrem(self.k("queue"), id)
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Images the nodes could not read, with the reason, sorted by id.
    pub async fn bad_images(&self) -> Result<Vec<(String, String)>> {
        let mut c = self.conn.clone();
        let mut v: Vec<(String, String)> = c.hgetall(self.k("images:bad")).await?;
        v.sort();
        Ok(v)
    }

    pub async fn image_ids(&self) -> Result<Vec<String>> {
        self.members("images").await
    }

    /// Ids of a held-out split, sorted.
    pub async fn held_out_ids(&self, split: &str) -> Result<Vec<String>> {
        self.members(&format!("split:{split}")).await
    }

    pub(crate) async fn members(&self, set: &str) -> Result<Vec<String>> {
        let mut c = self.conn.clone();
        let mut v: Vec<String> = c.smembers(self.k(set)).await?;
        v.sort();
        Ok(v)
    }

    /// Many images at once (metadata pipelined, pixels read concurrently); any unknown id,
    /// missing or corrupt image is an error.
    pub async fn images(&self, ids: &[String]) -> Result<Vec<ImageRecord>> {
        let (ok, mut bad) = self.images_lenient(ids).await?;
        match bad.is_empty() {
            true => Ok(ok),
            false => Err(bad.swap_remove(0).1),
        }
    }

    /// Many images; those that are unknown, missing from the image store or corrupt there are
    /// returned apart with the reason, so that a batch is not lost to one bad image. An
    /// unreachable Redis or image store is still an error.
    pub async fn images_lenient(
        &self,
        ids: &[String],
    ) -> Result<(Vec<ImageRecord>, Vec<(String, StoreError)>)> {
        let store = self.image_store().await?;
        let mut out = Vec::with_capacity(ids.len());
        let mut bad = Vec::new();
        let mut c = self.conn.clone();
        for chunk in ids.chunks(500) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.hgetall(self.k(&format!("img:{id}")));
            }
            let hs: Vec<HashMap<String, Vec<u8>>> = pipe.query_async(&mut c).await?;
            let mut metas = Vec::with_capacity(chunk.len());
            for (id, h) in chunk.iter().zip(hs) {
                if h.is_empty() {
                    let e = StoreError::NotFound(format!("image {id:?} does not exist"));
                    bad.push((id.clone(), e));
                    continue;
                }
                match image_from_hash(id, &h) {
                    Ok(m) => metas.push(m),
                    Err(e) => bad.push((id.clone(), e)),
                }
            }
            let keys: Vec<(&str, Shape)> =
                metas.iter().map(|m| (m.id.as_str(), shape_of(m))).collect();
            let pixels = store.get_many(&keys).await;
            for (mut m, px) in metas.into_iter().zip(pixels) {
                match px {
                    Ok(px) => {
                        m.pixels = px.to_vec();
                        out.push(m)
                    }
                    Err(e @ StoreError::Unavailable(_)) => return Err(e),
                    Err(e) => bad.push((m.id, e)),
                }
            }
        }
        Ok((out, bad))
    }
}

fn shape_of(im: &ImageRecord) -> Shape {
    Shape {
        width: im.width,
        height: im.height,
        channels: im.channels,
    }
}
