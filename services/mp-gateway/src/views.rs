//! Predictions and saliency maps for the image view, computed on a thread that owns the
//! models (a `tch` model is not `Sync`); views are stored in the image store per model
//! version (the scoring pass writes most of them before any expert asks).

use mp_core::model::Model;
use mp_core::saliency::{maps_to_vecs, saliency_maps, Method};
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
    let probs = mp_core::train::predict(model, &x);
    let probabilities = Vec::<f32>::try_from(&probs.get(0)).map_err(|e| e.to_string())?;
    let label = i64::from(im.label).min(model.spec.num_classes() - 1);
    let y = Tensor::from_slice(&[label]).to_device(model.device());
    let maps = saliency_maps(model, &x, &y, Method::Gradient).map_err(|e| e.to_string())?;
    let map = maps_to_vecs(&maps).map_err(|e| e.to_string())?.remove(0);
    Ok(ModelView {
        probabilities,
        saliency: mp_core::render::normalise(&map),
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
