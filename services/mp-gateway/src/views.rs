//! Predictions and saliency maps for the image view, computed on a thread that owns the
//! models (a `tch` model is not `Sync`); views are stored in the image store per model
//! version (the scoring pass writes most of them before any expert asks).

use mp_core::model::Model;
use mp_core::saliency::probabilities_and_maps;
use mp_store::ImageRecord;
use std::collections::VecDeque;
use std::path::PathBuf;
use tch::Tensor;
use tokio::sync::{mpsc, oneshot};

pub use mp_store::ModelView;

struct Request {
    version: u64,
    file: PathBuf,
    image: ImageRecord,
    reply: oneshot::Sender<Result<ModelView, String>>,
}

/// Handle to the model thread.
#[derive(Clone)]
pub struct ViewPool {
    tx: mpsc::Sender<Request>,
}

/// Pixels (interleaved u8) as a (1, C, H, W) tensor in [0, 1].
pub fn image_tensor(im: &ImageRecord) -> Result<Tensor, String> {
    let (w, h, c) = (im.width as usize, im.height as usize, im.channels as usize);
    if im.pixels.len() != w * h * c {
        return Err(format!(
            "image {} holds {} bytes, expected {}",
            im.id,
            im.pixels.len(),
            w * h * c
        ));
    }
    let mut chw = vec![0f32; w * h * c];
    for i in 0..w * h {
        for k in 0..c {
            chw[k * w * h + i] = im.pixels[i * c + k] as f32 / 255.0;
        }
    }
    Ok(Tensor::from_slice(&chw).reshape([1, c as i64, h as i64, w as i64]))
}

fn compute(model: &Model, im: &ImageRecord) -> Result<ModelView, String> {
    let x = image_tensor(im)?.to_device(model.device());
    let label = i64::from(im.label).min(model.spec.num_classes() - 1);
    let y = Tensor::from_slice(&[label]).to_device(model.device());
    let (mut probs, maps) = probabilities_and_maps(model, &x, &y).map_err(|e| e.to_string())?;
    Ok(ModelView {
        probabilities: probs.remove(0),
        saliency: mp_core::render::normalise(&maps[0]),
    })
}

impl ViewPool {
    /// Starts the model thread; it keeps the `cache` most recently used versions loaded.
    pub fn start(cache: usize) -> ViewPool {
        let (tx, mut rx) = mpsc::channel::<Request>(256);
        std::thread::Builder::new()
            .name("mp-views".into())
            .spawn(move || {
                tch::set_num_threads(1);
                let mut models: VecDeque<(u64, Model)> = VecDeque::new();
                while let Some(req) = rx.blocking_recv() {
                    let pos = models.iter().position(|(v, _)| *v == req.version);
                    let result = match pos {
                        Some(i) => Ok(i),
                        None => match Model::load(&req.file, mp_core::device::auto()) {
                            Ok(m) => {
                                models.push_front((req.version, m));
                                models.truncate(cache.max(1));
                                Ok(0)
                            }
                            Err(e) => Err(format!("loading model version {}: {e}", req.version)),
                        },
                    };
                    let out = result.and_then(|i| {
                        let (_, m) = &models[i];
                        let spec = &m.spec;
                        if (spec.width, spec.height, spec.channels)
                            != (
                                req.image.width as usize,
                                req.image.height as usize,
                                req.image.channels as usize,
                            )
                        {
                            return Err(format!(
                                "image {} does not fit model version {}",
                                req.image.id, req.version
                            ));
                        }
                        compute(m, &req.image)
                    });
                    let _ = req.reply.send(out);
                }
            })
            .expect("spawn view thread");
        ViewPool { tx }
    }

    pub async fn view(
        &self,
        version: u64,
        file: PathBuf,
        image: ImageRecord,
    ) -> Result<ModelView, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request {
                version,
                file,
                image,
                reply,
            })
            .await
            .map_err(|_| "view thread stopped".to_string())?;
        rx.await
            .map_err(|_| "view thread dropped the request".to_string())?
    }
}

type Waiting = std::collections::HashMap<(u64, String), Vec<oneshot::Sender<()>>>;

/// Experts waiting for views the workers compute: registered before the request is made,
/// woken by the workers' announcements (`Store::view_events`). Concurrent requests for one
/// view share one request to the workers.
#[derive(Clone, Default)]
pub struct ViewWaiters {
    waiting: std::sync::Arc<std::sync::Mutex<Waiting>>,
}

impl ViewWaiters {
    /// Registers a waiter for `(version, image)`; `true` when it is the first, which makes
    /// the request.
    pub fn register(&self, version: u64, image: &str) -> (oneshot::Receiver<()>, bool) {
        let (tx, rx) = oneshot::channel();
        let mut w = self.waiting.lock().expect("waiters lock");
        let list = w.entry((version, image.to_string())).or_default();
        list.retain(|s| !s.is_closed());
        list.push(tx);
        (rx, list.len() == 1)
    }

    /// Drops the waiters nobody listens to any more (timed out or served otherwise).
    pub fn forget(&self, version: u64, image: &str) {
        let mut w = self.waiting.lock().expect("waiters lock");
        let key = (version, image.to_string());
        if let Some(list) = w.get_mut(&key) {
            list.retain(|s| !s.is_closed());
            if list.is_empty() {
                w.remove(&key);
            }
        }
    }

    /// Wakes everyone waiting for these views.
    pub fn ready(&self, version: u64, ids: &[String]) {
        let mut w = self.waiting.lock().expect("waiters lock");
        for id in ids {
            for s in w.remove(&(version, id.clone())).unwrap_or_default() {
                let _ = s.send(());
            }
        }
    }

    pub fn len(&self) -> usize {
        self.waiting.lock().expect("waiters lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Follows the workers' announcements for as long as the process runs, reconnecting
    /// after a lost connection (waiters time out meanwhile and the gateway computes).
    pub fn follow(&self, store: mp_store::Store) {
        use futures::StreamExt;
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                match store.view_events().await {
                    Ok(events) => {
                        let mut events = std::pin::pin!(events);
                        while let Some((version, ids)) = events.next().await {
                            me.ready(version, &ids);
                        }
                        tracing::warn!("view announcements: connection lost; reconnecting");
                    }
                    Err(e) => tracing::warn!(error = %e, "view announcements: subscribing failed"),
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_share_one_request_and_all_wake() {
        let w = ViewWaiters::default();
        let (mut a, first_a) = w.register(3, "x");
        let (mut b, first_b) = w.register(3, "x");
        let (mut c, first_c) = w.register(4, "x");
        assert!(first_a && !first_b && first_c);
        w.ready(3, &["x".to_string()]);
        assert!(a.try_recv().is_ok() && b.try_recv().is_ok());
        assert!(c.try_recv().is_err(), "another version's waiter was woken");
        drop(c);
        w.forget(4, "x");
        assert!(w.is_empty());
        // After a timeout the next asker makes the request again.
        let (_d, first_d) = w.register(3, "x");
        assert!(first_d);
    }
}
