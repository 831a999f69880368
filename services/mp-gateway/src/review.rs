//! Settling the marks of an image several experts marked (overlap > 1): automatically when
//! they agree (κ ≥ the project's `review_below`: per-pixel majority), else by a reviewer
//! (`LeaseReview`, `Settle`). Only a settled mark's proposal can be committed; the experts'
//! own proposals stay provisional (ARCHITECTURE.md, "Several experts on one image").

use crate::service::{check_id, proposal_to_pb, status, Gateway};
use mp_core::agreement::settlement_kappa;
use mp_proto::marks::{merge_majority, merge_union_red};
use mp_proto::rle;
use mp_proto::v1 as pb;
use mp_store::{Role, Settled, Store, StoreError};
use tonic::{Request, Response, Status};
use tracing::info;

/// How long a reviewer holds an image before it goes back to the review queue.
pub const REVIEW_LEASE_MS: u64 = 15 * 60 * 1000;

/// What became of an image whose marks may be complete.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Fewer marks than the overlap asks for: nothing to settle yet.
    Waiting,
    /// Settled by majority (now or before).
    Settled(Settled),
    /// Waiting for (or held by) a reviewer.
    InReview,
}

/// Settles image `image` if it has all its marks: merged per pixel by majority, owned by the
/// expert of the last mark, when they agree (κ ≥ `review_below`), else queued for review.
/// Safe to repeat and to race (the store's scripts settle or queue an image once).
pub async fn settle_or_review(store: &Store, image: &str) -> Result<Outcome, StoreError> {
    if let Some(s) = settled_before(store, image).await? {
        return Ok(Outcome::Settled(s));
    }
    let overlap = store.overlap().await?;
    let marks = store.marks_of_image(image).await?;
    if marks.len() < overlap.max(2) as usize {
        return Ok(Outcome::Waiting);
    }
    let masks: Vec<&[i8]> = marks.iter().map(|m| m.values.as_slice()).collect();
    let kappa = settlement_kappa(&masks);
    let below = store.review_below().await?;
    if kappa < below {
        if store.queue_review(image, kappa).await? {
            info!(image, kappa, below, "marks disagree: queued for review");
        }
        // Refused only when settled or queued already: say which.
        return Ok(match settled_before(store, image).await? {
            Some(s) => Outcome::Settled(s),
            None => Outcome::InReview,
        });
    }
    let merged = merge_majority(&masks);
    let last = marks.last().expect("at least two marks");
    let from: Vec<String> = marks.iter().map(|m| m.id.clone()).collect();
    match store
        .settle(
            image,
            &last.expert_id,
            last.width,
            last.height,
            &merged,
            "majority",
            kappa,
            &from,
            None,
        )
        .await
    {
        Ok(s) => {
            if !s.duplicate {
                info!(image, kappa, proposal = %s.proposal_id, "marks agree: settled by majority");
            }
            Ok(Outcome::Settled(s))
        }
        // Queued for review in between (a racing call with other marks): the reviewer settles.
        Err(StoreError::FailedPrecondition(_)) => Ok(Outcome::InReview),
        Err(e) => Err(e),
    }
}

/// The image's settlement, if it was settled already.
async fn settled_before(store: &Store, image: &str) -> Result<Option<Settled>, StoreError> {
    let Some(mark) = store.settled_mark_of(image).await? else {
        return Ok(None);
    };
    let m = store.mark(&mark).await?;
    Ok(Some(Settled {
        mark_id: mark,
        proposal_id: m.proposal_id,
        duplicate: true,
    }))
}

/// The reaper's sweep: settles (or queues for review) every image a crash left with all its
/// marks and neither. Returns how many it handled.
pub async fn sweep(store: &Store) -> Result<usize, StoreError> {
    let images = store.unsettled().await?;
    for image in &images {
        settle_or_review(store, image).await?;
    }
    Ok(images.len())
}

fn may_review(role: Role) -> Result<(), Status> {
    match role {
        Role::Reviewer | Role::Admin => Ok(()),
        Role::Expert => Err(Status::permission_denied(
            "reviewing needs the reviewer (or admin) role",
        )),
    }
}

impl Gateway {
    pub(crate) async fn lease_review_rpc(
        &self,
        req: &Request<pb::LeaseReviewRequest>,
    ) -> Result<Response<pb::LeaseReviewReply>, Status> {
        let e = self.expert(req).await?;
        may_review(e.role)?;
        let store = self.store()?;
        let Some(l) = store
            .lease_review(&e.id, REVIEW_LEASE_MS)
            .await
            .map_err(status)?
        else {
            return Ok(Response::new(pb::LeaseReviewReply { item: None }));
        };
        let marks = store.marks_of_image(&l.image_id).await.map_err(status)?;
        let mut out = Vec::with_capacity(marks.len());
        let (mut width, mut height) = (0, 0);
        for m in &marks {
            (width, height) = (m.width, m.height);
            let p = match m.proposal_id.as_str() {
                "" => None,
                id => store.proposal(id).await.ok(),
            };
            let p = p.map(|p| proposal_to_pb(&p));
            out.push(pb::ReviewMark {
                mark_id: m.id.clone(),
                expert_id: m.expert_id.clone(),
                expert_name: store
                    .expert(&m.expert_id)
                    .await
                    .map(|x| x.name)
                    .unwrap_or_default(),
                mask: Some(rle::encode(m.width, m.height, &m.values)),
                proposal_status: p.as_ref().map(|p| p.status).unwrap_or_default(),
                val_accuracy_before: p.as_ref().map(|p| p.val_accuracy_before).unwrap_or(0.0),
                val_accuracy_after: p.as_ref().map(|p| p.val_accuracy_after).unwrap_or(0.0),
            });
        }
        Ok(Response::new(pb::LeaseReviewReply {
            item: Some(pb::ReviewItem {
                review_lease_id: l.lease_id,
                image_id: l.image_id,
                kappa: l.kappa,
                deadline_ms: l.deadline_ms,
                width,
                height,
                marks: out,
            }),
        }))
    }

    pub(crate) async fn settle_rpc(
        &self,
        req: &Request<pb::SettleRequest>,
    ) -> Result<Response<pb::SettleReply>, Status> {
        let e = self.expert(req).await?;
        may_review(e.role)?;
        let body = req.get_ref();
        check_id("review_lease_id", &body.review_lease_id)?;
        let store = self.store()?;
        let lease = store
            .review_lease(&body.review_lease_id)
            .await
            .map_err(status)?;
        if lease.reviewer != e.id {
            return Err(Status::permission_denied(format!(
                "review lease {} belongs to another reviewer",
                lease.lease_id
            )));
        }
        let marks = store
            .marks_of_image(&lease.image_id)
            .await
            .map_err(status)?;
        let first = marks
            .first()
            .ok_or_else(|| Status::failed_precondition("the image under review has no marks"))?;
        let (width, height) = (first.width, first.height);
        let masks: Vec<&[i8]> = marks.iter().map(|m| m.values.as_slice()).collect();
        use pb::settle_request::Method;
        let method = Method::try_from(body.method)
            .map_err(|_| Status::invalid_argument(format!("unknown method {}", body.method)))?;
        let (values, how) = match method {
            Method::Unspecified => {
                return Err(Status::invalid_argument(
                    "method must be ACCEPT, MAJORITY, UNION_RED or OWN",
                ))
            }
            Method::Accept => {
                let m = marks
                    .iter()
                    .find(|m| m.id == body.accept_mark_id)
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "accept_mark_id {:?} is not one of the image's marks",
                            body.accept_mark_id
                        ))
                    })?;
                (m.values.clone(), format!("accept:{}", m.id))
            }
            Method::Majority => (merge_majority(&masks), "majority".to_string()),
            Method::UnionRed => (merge_union_red(&masks), "union_red".to_string()),
            Method::Own => {
                let mask = body
                    .mask
                    .as_ref()
                    .ok_or_else(|| Status::invalid_argument("OWN needs a mask"))?;
                if (mask.width, mask.height) != (width, height) {
                    return Err(Status::invalid_argument(format!(
                        "mask is {}x{} but image {} is {width}x{height}",
                        mask.width, mask.height, lease.image_id
                    )));
                }
                let v = rle::decode(mask).map_err(|e| Status::invalid_argument(e.to_string()))?;
                (v, "own".to_string())
            }
        };
        let from: Vec<String> = marks.iter().map(|m| m.id.clone()).collect();
        let s = store
            .settle(
                &lease.image_id,
                &e.id,
                width,
                height,
                &values,
                &how,
                lease.kappa,
                &from,
                Some(&lease.lease_id),
            )
            .await
            .map_err(status)?;
        info!(reviewer = %e.id, image = %lease.image_id, how, "review settled");
        Ok(Response::new(pb::SettleReply {
            mark_id: s.mark_id,
            proposal_id: s.proposal_id,
            duplicate: s.duplicate,
        }))
    }
}
