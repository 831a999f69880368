//! The data model against a real redis-server on a free port.

use mp_store::server::RedisServer;
use mp_store::{AuditFilter, ModelVersionRecord, ProjectInfo, Role, Store, StoreError};

async fn setup() -> (tempfile::TempDir, RedisServer, Store, String) {
    let dir = tempfile::tempdir().unwrap();
    let server = RedisServer::start_free(dir.path()).unwrap();
    let store = Store::connect(&server.url(), "t").await.unwrap();
    store
        .set_project(&ProjectInfo {
            name: "p".into(),
            classes: vec!["a".into(), "b".into()],
            width: 2,
            height: 2,
            channels: 1,
            image_store: dir.path().join("images").display().to_string(),
        })
        .await
        .unwrap();
    store
        .put_images(
            &(0..5)
                .map(|i| mp_store::ImageRecord {
                    id: format!("a/{i}"),
                    name: format!("{i}"),
                    label: 0,
                    width: 2,
                    height: 2,
                    channels: 1,
                    pixels: vec![i as u8; 4],
                })
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    store
        .publish_version(&ModelVersionRecord {
            version: 1,
            parent: 0,
            created_ms: 0,
            reason: "init".into(),
            val_accuracy: 0.5,
            val_loss: 1.0,
            test_accuracy: 0.5,
            file: "v1.safetensors".into(),
        })
        .await
        .unwrap();
    store.ensure_job_groups().await.unwrap();
    let (id, _) = store.create_expert("ann", Role::Expert).await.unwrap();
    (dir, server, store, id)
}

#[tokio::test]
async fn lease_order_heartbeat_skip_submit_and_idempotency() {
    let (_d, _s, store, ann) = setup().await;
    let (bob, bob_token) = store.create_expert("bob", Role::Expert).await.unwrap();
    assert_eq!(store.authenticate(&bob_token).await.unwrap().id, bob);
    assert!(matches!(
        store.authenticate("mp_wrong").await,
        Err(StoreError::Unauthenticated(_))
    ));
    store
        .enqueue(&[
            ("a/0".into(), 0.5),
            ("a/1".into(), -0.9),
            ("a/2".into(), 0.1),
        ])
        .await
        .unwrap();
    // Lowest priority first, never twice.
    let l1 = store.lease(&ann, 30_000).await.unwrap().unwrap();
    assert_eq!((l1.image_id.as_str(), l1.model_version), ("a/1", 1));
    let l2 = store.lease(&bob, 30_000).await.unwrap().unwrap();
    assert_eq!(l2.image_id, "a/2");
    assert!(l2.seq > l1.seq);
    // Only the owner may act on a lease.
    assert!(matches!(
        store.heartbeat(&l1.lease_id, &bob, 1000).await,
        Err(StoreError::PermissionDenied(_))
    ));
    assert!(matches!(
        store.skip(&l1.lease_id, &bob).await,
        Err(StoreError::PermissionDenied(_))
    ));
    assert!(matches!(
        store.heartbeat("nope", &ann, 1000).await,
        Err(StoreError::NotFound(_))
    ));
    let d = store.heartbeat(&l1.lease_id, &ann, 60_000).await.unwrap();
    assert!(d > l1.deadline_ms);
    // Skip puts the image behind the others.
    let seq = store.skip(&l2.lease_id, &bob).await.unwrap();
    // A retried skip answers the first result and moves nothing.
    assert_eq!(store.skip(&l2.lease_id, &bob).await.unwrap(), seq);
    assert!(matches!(
        store.heartbeat(&l2.lease_id, &bob, 1000).await,
        Err(StoreError::FailedPrecondition(_))
    ));
    let l3 = store.lease(&bob, 30_000).await.unwrap().unwrap();
    assert_eq!(l3.image_id, "a/0");
    let l4 = store.lease(&bob, 30_000).await.unwrap().unwrap();
    assert_eq!(l4.image_id, "a/2");
    assert!(store.lease(&bob, 30_000).await.unwrap().is_none());
    // Submit stores once per key, enqueues one refine job, creates the proposal.
    let r = store
        .submit(&l1.lease_id, &ann, "k1", 2, 2, &[1, 0, -1, 0])
        .await
        .unwrap();
    assert!(!r.duplicate);
    let again = store
        .submit(&l1.lease_id, &ann, "k1", 2, 2, &[1, 0, -1, 0])
        .await
        .unwrap();
    assert!(again.duplicate && again.mark_id == r.mark_id && again.proposal_id == r.proposal_id);
    assert!(matches!(
        store.submit(&l1.lease_id, &ann, "k2", 2, 2, &[0; 4]).await,
        Err(StoreError::FailedPrecondition(_))
    ));
    assert_eq!(store.mark_ids().await.unwrap(), vec![r.mark_id.clone()]);
    let m = store.mark(&r.mark_id).await.unwrap();
    assert_eq!(
        (m.image_id.as_str(), m.values.clone(), m.model_version),
        ("a/1", vec![1, 0, -1, 0], 1)
    );
    let p = store.proposal(&r.proposal_id).await.unwrap();
    assert_eq!(
        (p.status.as_str(), p.base_version, p.mark_id.as_str()),
        ("queued", 1, r.mark_id.as_str())
    );
    let counts = store.counts().await.unwrap();
    assert_eq!(
        (
            counts.marks_total,
            counts.refine_pending,
            counts.leases_out,
            counts.queue_depth
        ),
        (1, 1, 2, 0)
    );
    // A marked image is not queued again.
    assert_eq!(
        store
            .enqueue(&[("a/1".into(), -1.0), ("a/3".into(), 0.0)])
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn an_abandoned_lease_comes_back_after_its_deadline() {
    let (_d, _s, store, ann) = setup().await;
    store.enqueue(&[("a/0".into(), 0.0)]).await.unwrap();
    let l = store.lease(&ann, 150).await.unwrap().unwrap();
    assert!(store.lease(&ann, 150).await.unwrap().is_none());
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    assert!(matches!(
        store.heartbeat(&l.lease_id, &ann, 1000).await,
        Err(StoreError::FailedPrecondition(_))
    ));
    let back = store.lease(&ann, 1000).await.unwrap().unwrap();
    assert_eq!(back.image_id, "a/0");
    assert!(matches!(
        store.submit(&l.lease_id, &ann, "x", 2, 2, &[0; 4]).await,
        Err(StoreError::FailedPrecondition(_))
    ));
    // The reaper path too.
    let _ = store.skip(&back.lease_id, &ann).await.unwrap();
    let l = store.lease(&ann, 100).await.unwrap().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(store.reclaim().await.unwrap(), 1);
    assert_eq!(store.counts().await.unwrap().queue_depth, 1);
    assert!(store.lease_info(&l.lease_id).await.unwrap().state == "expired");
}

#[tokio::test]
async fn acknowledged_submits_survive_kill_9_of_redis() {
    let (_d, mut server, store, ann) = setup().await;
    store
        .enqueue(&[("a/0".into(), 0.0), ("a/1".into(), 0.1)])
        .await
        .unwrap();
    let l = store.lease(&ann, 60_000).await.unwrap().unwrap();
    let r = store
        .submit(&l.lease_id, &ann, "durable", 2, 2, &[1, 1, 0, 0])
        .await
        .unwrap();
    server.kill9();
    assert!(matches!(store.counts().await, Err(StoreError::Redis(_))));
    server.restart().unwrap();
    // Every transaction of the AOF replayed (the ACL must not stop the replay).
    let log = std::fs::read_to_string(server.dir.join("redis.log")).unwrap();
    assert!(!log.contains("CRITICAL"), "{log}");
    let store = Store::connect(&server.url(), "t").await.unwrap();
    assert_eq!(
        store.mark(&r.mark_id).await.unwrap().values,
        vec![1, 1, 0, 0]
    );
    assert_eq!(store.mark_ids().await.unwrap().len(), 1);
    let dup = store
        .submit(&l.lease_id, &ann, "durable", 2, 2, &[1, 1, 0, 0])
        .await
        .unwrap();
    assert!(dup.duplicate && dup.mark_id == r.mark_id);
}

#[tokio::test]
async fn the_latency_monitor_records_a_slow_command() {
    let (_dir, _server, store, _) = setup().await;
    assert!(store.latency_history("command").await.unwrap().is_empty());
    store.monitor_latency(5).await.unwrap();
    // A script that keeps Redis busy for about 30 ms.
    let slow = redis::Script::new(
        "local t = redis.call('TIME') local s = t[1] * 1e6 + t[2] \
         while true do local n = redis.call('TIME') if n[1] * 1e6 + n[2] - s > 30000 then break end end \
         return 1",
    );
    let _: i64 = slow.invoke_async(&mut store.connection()).await.unwrap();
    let h = store.latency_history("command").await.unwrap();
    assert_eq!(h.len(), 1, "{h:?}");
    assert!(h[0].1 >= 25, "{h:?}");
    assert!(store
        .latency_history("aof-fsync-always")
        .await
        .unwrap()
        .iter()
        .all(|&(_, ms)| ms >= 5));
}

#[tokio::test]
async fn suggestions_round_trip_per_version_fall_back_to_the_newest_and_corrupt_ones_are_refused() {
    let (_dir, _server, store, _) = setup().await;
    let s = mp_store::Suggestion {
        mode: "segmenter".into(),
        marks: 12,
        values: vec![0, 0, 0, 127, 127, -3, 0, 0],
    };
    let big = mp_store::Suggestion {
        mode: "union".into(),
        marks: 1,
        values: vec![5; 300_000],
    };
    store
        .put_suggestions(2, &[("a/1".into(), s.clone()), ("a/2".into(), big.clone())])
        .await
        .unwrap();
    assert_eq!(store.suggestion(2, "a/1").await.unwrap(), Some(s.clone()));
    assert_eq!(store.suggestion(2, "a/2").await.unwrap(), Some(big.clone()));
    assert!(big.encode().len() < 16, "runs compress");
    // A version that scoring never saw (published by a mid-round commit) gets the newest
    // suggestion of the image: suggestions come from the marks, not from the model.
    assert_eq!(store.suggestion(3, "a/1").await.unwrap(), Some(s.clone()));
    assert_eq!(store.suggestion(2, "a/0").await.unwrap(), None);
    // Overwritten by a later scoring of the same version.
    let newer = mp_store::Suggestion {
        marks: 13,
        ..s.clone()
    };
    store
        .put_suggestions(2, &[("a/1".into(), newer.clone())])
        .await
        .unwrap();
    assert_eq!(store.suggestion(2, "a/1").await.unwrap(), Some(newer));
    // A forged or truncated record is an error, not a panic.
    for bad in [
        vec![],
        vec![9, b'x'],
        s.encode()[..s.encode().len() - 1].to_vec(),
        vec![0, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    ] {
        let mut c = store.connection();
        let _: () = redis::AsyncCommands::set(&mut c, "t:suggest:9:a/1", bad.clone())
            .await
            .unwrap();
        assert!(
            matches!(
                store.suggestion(9, "a/1").await,
                Err(StoreError::Corrupt(_))
            ),
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn a_version_without_a_test_accuracy_or_with_a_diverged_loss_reads_back_as_nan() {
    let (_dir, _server, store, _) = setup().await;
    store
        .publish_version(&ModelVersionRecord {
            version: 2,
            parent: 1,
            created_ms: 1,
            reason: "no test split, loss diverged".into(),
            val_accuracy: f64::NAN,
            val_loss: f64::NAN,
            test_accuracy: f64::NAN,
            file: "v2.safetensors".into(),
        })
        .await
        .unwrap();
    let v = store.version(2).await.unwrap();
    assert!(v.test_accuracy.is_nan() && v.val_loss.is_nan() && v.val_accuracy.is_nan());
    assert_eq!(store.versions().await.unwrap().len(), 2);
}

#[tokio::test]
async fn view_requests_reach_the_stream_and_announcements_reach_every_subscriber() {
    use futures::StreamExt;
    let (_d, _s, store, _) = setup().await;
    // Nobody serves views until a worker says so; the word lapses.
    assert_eq!(store.view_workers(2_000).await.unwrap(), 0);
    store.view_worker_alive("w1").await.unwrap();
    store.view_worker_alive("w1").await.unwrap();
    assert_eq!(store.view_workers(2_000).await.unwrap(), 1);
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    assert_eq!(store.view_workers(10).await.unwrap(), 0);
    // A request is one stream entry with the version, the image and its time.
    store.request_view(3, "a/1").await.unwrap();
    let jobs = store
        .read_jobs(mp_store::VIEW_STREAM, "view", "w1", 10, 1)
        .await
        .unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        (
            jobs[0].get("version").unwrap(),
            jobs[0].get("image").unwrap()
        ),
        ("3", "a/1")
    );
    assert!(jobs[0].get("t").unwrap().parse::<u64>().unwrap() > 0);
    // Two subscribers both hear one announcement, ids with spaces intact.
    let mut a = Box::pin(store.view_events().await.unwrap());
    let mut b = Box::pin(store.view_events().await.unwrap());
    store.views_ready(3, &["a/1", "b c"]).await.unwrap();
    store.views_ready(4, &[]).await.unwrap(); // nothing to say: nothing sent
    let want = (3, vec!["a/1".to_string(), "b c".to_string()]);
    let within = std::time::Duration::from_secs(5);
    assert_eq!(
        tokio::time::timeout(within, a.next()).await.unwrap(),
        Some(want.clone())
    );
    assert_eq!(
        tokio::time::timeout(within, b.next()).await.unwrap(),
        Some(want)
    );
}

fn version(v: u64, parent: u64) -> ModelVersionRecord {
    ModelVersionRecord {
        version: v,
        parent,
        created_ms: 0,
        reason: format!("v{v}"),
        val_accuracy: 0.5,
        val_loss: 1.0,
        test_accuracy: 0.5,
        file: format!("v{v}.safetensors"),
    }
}

/// A submitted mark's proposal, made `ready` as a worker would.
async fn ready_proposal(store: &Store, expert: &str) -> mp_store::SubmitResult {
    store.enqueue(&[("a/0".into(), 0.0)]).await.unwrap();
    let l = store.lease(expert, 30_000).await.unwrap().unwrap();
    let r = store
        .submit(&l.lease_id, expert, "k", 2, 2, &[1, 0, -1, 0])
        .await
        .unwrap();
    store
        .update_proposal(&r.proposal_id, "ready", &[])
        .await
        .unwrap();
    r
}

async fn stream_len(store: &Store, stream: &str) -> u64 {
    let mut c = store.connection();
    redis::cmd("XLEN")
        .arg(format!("{}:{stream}", store.prefix()))
        .query_async(&mut c)
        .await
        .unwrap()
}

#[tokio::test]
async fn commit_and_reject_racing_on_one_proposal_one_wins_and_a_commit_always_has_its_job() {
    let (_d, _s, store, ann) = setup().await;
    let r = ready_proposal(&store, &ann).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (s, pid, who) = (store.clone(), r.proposal_id.clone(), ann.clone());
        tasks.push(tokio::spawn(async move {
            s.decide(&pid, &who, i % 2 == 0).await
        }));
    }
    let mut won = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(status) => won.push(status),
            Err(StoreError::FailedPrecondition(m)) => assert!(m.contains("not ready"), "{m}"),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(won.len(), 1, "{won:?}");
    let p = store.proposal(&r.proposal_id).await.unwrap();
    assert_eq!(p.status, won[0]);
    let jobs = stream_len(&store, mp_store::COMMIT_STREAM).await;
    assert_eq!(jobs, u64::from(won[0] == "committing"));
    assert!(matches!(
        store.decide("nope", &ann, true).await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_version_is_published_only_on_its_parent_and_a_commit_applies_its_mark_once() {
    let (_d, _s, store, ann) = setup().await;
    // Compare-and-set on the parent: v2 on v1 goes in; a rollback to v1 while v3 was being
    // built on v2 makes v3 lose, and nothing of it is written.
    store.publish_version(&version(2, 1)).await.unwrap();
    store.rollback(1).await.unwrap();
    assert!(matches!(
        store.publish_version(&version(3, 2)).await,
        Err(StoreError::Aborted(m)) if m.contains("now v1")
    ));
    assert_eq!(store.current_version().await.unwrap(), 1);
    assert_eq!(store.newest_version().await.unwrap(), 2);
    assert!(matches!(
        store.publish_version(&version(2, 1)).await,
        Err(StoreError::Aborted(m)) if m.contains("already exists")
    ));

    // A commit: not before the proposal is committing; then the version, the status and
    // the guidance together; a redelivered commit job changes nothing.
    let r = ready_proposal(&store, &ann).await;
    assert!(matches!(
        store
            .publish_commit(&version(3, 1), &r.proposal_id, &[])
            .await,
        Err(StoreError::FailedPrecondition(_))
    ));
    assert!(store.guidance_marks().await.unwrap().is_empty());
    assert_eq!(store.current_version().await.unwrap(), 1);
    store.decide(&r.proposal_id, &ann, true).await.unwrap();
    let done = store
        .publish_commit(
            &version(3, 1),
            &r.proposal_id,
            &[("message", "applied".to_string())],
        )
        .await
        .unwrap();
    assert_eq!(done, None);
    let p = store.proposal(&r.proposal_id).await.unwrap();
    assert_eq!(
        (p.status.as_str(), p.committed_version, p.message.as_str()),
        ("committed", 3, "applied")
    );
    assert_eq!(store.current_version().await.unwrap(), 3);
    let again = store
        .publish_commit(&version(4, 3), &r.proposal_id, &[])
        .await
        .unwrap();
    assert_eq!(again, Some(3));
    assert_eq!(store.current_version().await.unwrap(), 3);
    assert_eq!(store.newest_version().await.unwrap(), 3);
    let guidance = store.guidance_marks().await.unwrap();
    assert_eq!(guidance.len(), 1);
    assert_eq!(guidance[0].id, r.mark_id);
}

#[tokio::test]
async fn a_job_delivered_too_often_goes_to_the_dead_letters_with_its_last_error() {
    let (_d, _s, store, ann) = setup().await;
    let r = ready_proposal(&store, &ann).await;
    store.decide(&r.proposal_id, &ann, true).await.unwrap();
    let stream = mp_store::COMMIT_STREAM;
    let first = store.read_jobs(stream, "commit", "a", 10, 0).await.unwrap();
    assert_eq!(first.len(), 1);
    store
        .note_job_error(stream, &first[0].id, "disk full")
        .await
        .unwrap();
    // Delivered twice (read, then one take-over): under the limit of 2, handed out again.
    let again = store
        .reclaim_jobs(stream, "commit", "b", 0, 10, 2)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(store.counts().await.unwrap().dead_jobs, 0);
    // A third delivery would be over it: given up on instead.
    let third = store
        .reclaim_jobs(stream, "commit", "c", 0, 10, 2)
        .await
        .unwrap();
    assert!(third.is_empty());
    assert_eq!(store.backlog(stream, "commit").await.unwrap(), 0);
    assert_eq!(store.counts().await.unwrap().dead_jobs, 1);
    let dead = store.dead_jobs(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].stream.as_str(),
            dead[0].job_id.as_str(),
            dead[0].deliveries,
            dead[0].error.as_str()
        ),
        (stream, first[0].id.as_str(), 3, "disk full")
    );
    assert_eq!(dead[0].fields.get("proposal"), Some(&r.proposal_id));
    let p = store.proposal(&r.proposal_id).await.unwrap();
    assert_eq!(p.status, "failed");
    assert!(
        p.message.contains("3 deliveries: disk full"),
        "{}",
        p.message
    );
}

#[tokio::test]
async fn a_forged_version_record_cannot_name_a_file_outside_the_checkpoint_directory() {
    let (_d, _s, store, _) = setup().await;
    for bad in [
        "../../etc/passwd",
        "/etc/passwd",
        "a/../../b",
        "v2.safetensors\n",
        "",
    ] {
        let mut rec = version(2, 1);
        rec.file = bad.to_string();
        assert!(
            matches!(
                store.publish_version(&rec).await,
                Err(StoreError::InvalidArgument(_))
            ),
            "{bad:?}"
        );
    }
    assert_eq!(store.current_version().await.unwrap(), 1);
    // Written behind the store's back: read back as corrupt, never as a path.
    let mut forged = version(9, 1);
    forged.file = "../../../root/.ssh/authorized_keys".into();
    let mut c = store.connection();
    let _: () = redis::cmd("HSET")
        .arg("t:model:versions")
        .arg(9)
        .arg(serde_json::to_string(&forged).unwrap())
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(matches!(
        store.version(9).await,
        Err(StoreError::Corrupt(m)) if m.contains("not a plain file name")
    ));
    assert!(mp_store::check_relative_file("suggesters/m3-17.safetensors").is_ok());
    assert!(mp_store::check_hex_id("proposal", "0a1b2c").is_ok());
    assert!(mp_store::check_hex_id("proposal", "../x").is_err());
}

#[tokio::test]
async fn streams_are_trimmed_of_acknowledged_jobs_only() {
    let (_d, _s, store, _) = setup().await;
    let stream = mp_store::SCORE_STREAM;
    for i in 0..300 {
        store
            .add_job(
                stream,
                &[("kind", "score".to_string()), ("n", i.to_string())],
            )
            .await
            .unwrap();
    }
    // 250 delivered: 200 acknowledged, 50 still pending (a worker on them); 50 not delivered.
    let got = store.read_jobs(stream, "score", "w", 250, 0).await.unwrap();
    for j in &got[..200] {
        store.ack(stream, "score", &j.id).await.unwrap();
    }
    let removed = store.trim_streams().await.unwrap();
    assert!(removed > 0 && removed <= 200, "{removed}");
    assert_eq!(stream_len(&store, stream).await, 300 - removed);
    // The pending ones can still be taken over, the new ones still read.
    let pending = store
        .reclaim_jobs(stream, "score", "v", 0, 100, 5)
        .await
        .unwrap();
    assert_eq!(pending.len(), 50);
    assert_eq!(pending[0].fields["n"], "200");
    let rest = store.read_jobs(stream, "score", "v", 100, 0).await.unwrap();
    assert_eq!(rest.len(), 50);
    assert_eq!(store.trim_streams().await.unwrap(), 0);
}

#[tokio::test]
async fn redis_asks_for_the_password_and_refuses_dangerous_commands_to_the_platform() {
    let (_d, server, store, _) = setup().await;
    let open = format!("redis://127.0.0.1:{}", server.port);
    let no_password = Store::connect(&open, "t").await;
    let refused = match no_password {
        Err(e) => e.to_string(),
        Ok(s) => s.ping().await.unwrap_err().to_string(),
    };
    assert!(
        refused.contains("NOAUTH") || refused.contains("uthenticat"),
        "{refused}"
    );
    let mut c = store.connection();
    for cmd in ["FLUSHALL", "KEYS", "SHUTDOWN", "MONITOR"] {
        let mut q = redis::cmd(cmd);
        if cmd == "KEYS" {
            q.arg("*");
        }
        let r: redis::RedisResult<redis::Value> = q.query_async(&mut c).await;
        let e = r.expect_err(cmd).to_string();
        assert!(e.to_lowercase().contains("noperm"), "{cmd}: {e}");
    }
    assert!(
        store.project().await.unwrap().is_some(),
        "nothing was flushed"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(server.dir.join("redis.password"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// Overlap 3: each image goes to three different experts in turn — never twice to one
/// (marked or skipped), never to two at once — and leaves the queue with its third mark.
#[tokio::test]
async fn overlap_sends_an_image_to_n_different_experts_in_turn() {
    let (_d, _s, store, ann) = setup().await;
    assert!(matches!(
        store.set_overlap(0).await,
        Err(StoreError::InvalidArgument(_))
    ));
    assert_eq!(store.overlap().await.unwrap(), 1);
    store.set_overlap(3).await.unwrap();
    assert_eq!(store.overlap().await.unwrap(), 3);
    let mut experts = vec![ann];
    for name in ["bob", "cy", "dee"] {
        experts.push(store.create_expert(name, Role::Expert).await.unwrap().0);
    }
    store
        .enqueue(&[("a/0".into(), 0.1), ("a/1".into(), 0.2)])
        .await
        .unwrap();
    let mark = |l: &mp_store::LeaseGrant, e: &str, k: &str| {
        let (store, lid, e, k) = (
            store.clone(),
            l.lease_id.clone(),
            e.to_string(),
            k.to_string(),
        );
        async move {
            store
                .submit(&lid, &e, &k, 2, 2, &[1, 0, 0, -1])
                .await
                .unwrap()
        }
    };
    // Ann marks a/0: it comes back first, but not to her; she gets a/1.
    let l = store.lease(&experts[0], 30_000).await.unwrap().unwrap();
    assert_eq!(l.image_id, "a/0");
    mark(&l, &experts[0], "k0").await;
    assert_eq!(store.marks_on_image("a/0").await.unwrap(), 1);
    let l_ann = store.lease(&experts[0], 30_000).await.unwrap().unwrap();
    assert_eq!(l_ann.image_id, "a/1");
    // Ann skips a/1: it never comes back to her either.
    store.skip(&l_ann.lease_id, &experts[0]).await.unwrap();
    assert!(store.lease(&experts[0], 30_000).await.unwrap().is_none());
    // Bob holds a/0: nobody else gets it meanwhile.
    let l_bob = store.lease(&experts[1], 30_000).await.unwrap().unwrap();
    assert_eq!(l_bob.image_id, "a/0");
    let l_cy = store.lease(&experts[2], 30_000).await.unwrap().unwrap();
    assert_eq!(l_cy.image_id, "a/1");
    mark(&l_bob, &experts[1], "k1").await;
    mark(&l_cy, &experts[2], "k2").await;
    // Cy marks a/0 as its third expert: then it is done.
    let l = store.lease(&experts[2], 30_000).await.unwrap().unwrap();
    assert_eq!(l.image_id, "a/0");
    mark(&l, &experts[2], "k3").await;
    assert_eq!(store.marks_on_image("a/0").await.unwrap(), 3);
    let l = store.lease(&experts[3], 30_000).await.unwrap().unwrap();
    assert_eq!(l.image_id, "a/1", "a/0 has its three marks");
    store.skip(&l.lease_id, &experts[3]).await.unwrap();
    assert!(store.lease(&experts[3], 30_000).await.unwrap().is_none());
    // A new round's enqueue does not bring back an image with its three marks.
    store
        .enqueue(&[("a/0".into(), 0.0), ("a/1".into(), 0.0)])
        .await
        .unwrap();
    let l = store.lease(&experts[1], 30_000).await.unwrap().unwrap();
    assert_eq!(l.image_id, "a/1");
    assert!(store.lease(&experts[1], 30_000).await.unwrap().is_none());
}

/// Every mark, decision, commit, rollback, round-end request and token change leaves an
/// audit record with who, when and the versions and accuracies before and after; the
/// records are found by expert, image and version.
#[tokio::test]
async fn the_audit_trail_records_each_change_with_who_and_the_versions() {
    let (_d, _s, store, ann) = setup().await;
    let (admin, _) = store.create_expert("root", Role::Admin).await.unwrap();
    let (bob, _) = store
        .create_expert_by("bob", Role::Expert, None, &admin)
        .await
        .unwrap();
    store.enqueue(&[("a/0".into(), 0.1)]).await.unwrap();
    let l = store.lease(&ann, 30_000).await.unwrap().unwrap();
    let r = store
        .submit(&l.lease_id, &ann, "k", 2, 2, &[1, 0, 0, 0])
        .await
        .unwrap();
    store
        .update_proposal(&r.proposal_id, "ready", &[])
        .await
        .unwrap();
    store.decide(&r.proposal_id, &ann, true).await.unwrap();
    let v2 = ModelVersionRecord {
        version: 2,
        parent: 1,
        created_ms: 0,
        reason: "commit".into(),
        val_accuracy: 0.75,
        val_loss: 0.5,
        test_accuracy: 0.7,
        file: "v2.safetensors".into(),
    };
    assert_eq!(
        store
            .publish_commit(&v2, &r.proposal_id, &[])
            .await
            .unwrap(),
        None
    );
    store.rollback_by(1, &admin).await.unwrap();
    store.request_round_end_by(&admin).await.unwrap();
    store.revoke_expert_by(&bob, &admin).await.unwrap();

    let all = store.audit(&AuditFilter::default()).await.unwrap();
    let kinds: Vec<&str> = all.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "version", // v1 in setup
            "token_created",
            "token_created",
            "token_created",
            "mark",
            "decision",
            "commit",
            "rollback",
            "round_end_requested",
            "token_revoked"
        ]
    );
    assert!(all.windows(2).all(|w| w[0].time_ms <= w[1].time_ms));
    let find = |k: &str| all.iter().find(|r| r.kind == k).unwrap();
    let f = |k: &str, field: &str| find(k).fields.get(field).cloned().unwrap_or_default();
    assert_eq!(find("mark").who, ann);
    assert_eq!(f("mark", "image"), "a/0");
    assert_eq!(f("mark", "version_before"), "1");
    assert_eq!(
        (f("decision", "decision"), f("decision", "expert")),
        ("commit".into(), ann.clone())
    );
    let c = find("commit");
    assert_eq!(c.who, ann, "a commit is its expert's");
    assert_eq!(
        (f("commit", "version_before"), f("commit", "version_after")),
        ("1".into(), "2".into())
    );
    assert_eq!(
        (
            f("commit", "accuracy_before"),
            f("commit", "accuracy_after")
        ),
        ("0.5".into(), "0.75".into())
    );
    assert_eq!(f("commit", "proposal"), r.proposal_id);
    assert_eq!(find("rollback").who, admin);
    assert_eq!(
        (
            f("rollback", "version_before"),
            f("rollback", "version_after")
        ),
        ("2".into(), "1".into())
    );
    assert_eq!(find("token_revoked").fields["expert"], bob);
    // Queries.
    let by = |filter: AuditFilter| {
        let store = store.clone();
        async move {
            store
                .audit(&filter)
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.kind)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        by(AuditFilter {
            expert: Some(ann.clone()),
            ..Default::default()
        })
        .await,
        ["token_created", "mark", "decision", "commit"]
    );
    assert_eq!(
        by(AuditFilter {
            image: Some("a/0".into()),
            ..Default::default()
        })
        .await,
        ["mark", "decision", "commit"]
    );
    assert_eq!(
        by(AuditFilter {
            version: Some(2),
            ..Default::default()
        })
        .await,
        ["commit", "rollback"]
    );
    assert_eq!(
        by(AuditFilter {
            expert: Some(bob.clone()),
            limit: 1,
            ..Default::default()
        })
        .await,
        ["token_revoked"]
    );
}

/// With overlap, an expert's mark is provisional (committing its proposal only endorses it);
/// the image's marks are settled once — automatically or by one reviewer holding its review
/// lease — and only the settled mark's proposal can be committed.
#[tokio::test]
async fn overlapping_marks_are_settled_once_and_only_the_settled_mark_can_be_committed() {
    let (_d, _s, store, ann) = setup().await;
    store.set_overlap(2).await.unwrap();
    assert!((store.review_below().await.unwrap() - mp_store::DEFAULT_REVIEW_BELOW).abs() < 1e-9);
    assert!(matches!(
        store.set_review_below(2.0).await,
        Err(StoreError::InvalidArgument(_))
    ));
    let bob = store.create_expert("bob", Role::Expert).await.unwrap().0;
    let rev = store.create_expert("rev", Role::Reviewer).await.unwrap().0;
    let rev2 = store.create_expert("rev2", Role::Reviewer).await.unwrap().0;
    store
        .enqueue(&[("a/0".into(), 0.1), ("a/1".into(), 0.2)])
        .await
        .unwrap();
    let mut first = Vec::new();
    for (who, mask) in [(&ann, [1i8, 0, 0, -1]), (&bob, [-1, 0, 0, 1])] {
        for k in 0..2 {
            let l = store.lease(who, 30_000).await.unwrap().unwrap();
            let r = store
                .submit(&l.lease_id, who, &format!("{who}{k}"), 2, 2, &mask)
                .await
                .unwrap();
            assert!(r.provisional);
            first.push(r);
        }
    }
    assert_eq!(
        first.iter().map(|r| r.marks_on_image).collect::<Vec<_>>(),
        [1, 1, 2, 2]
    );
    assert_eq!(store.unsettled().await.unwrap(), ["a/0", "a/1"]);
    // A provisional proposal: committing it endorses it, with no commit job.
    let p = &first[0].proposal_id;
    store.update_proposal(p, "ready", &[]).await.unwrap();
    assert!(store.proposal(p).await.unwrap().provisional);
    assert_eq!(store.decide(p, &ann, true).await.unwrap(), "endorsed");
    assert_eq!(stream_len(&store, mp_store::COMMIT_STREAM).await, 0);
    let refines = stream_len(&store, mp_store::REFINE_STREAM).await;

    // a/0 disagrees: queued for review once; an automatic settlement is then refused.
    assert!(store.queue_review("a/0", -0.5).await.unwrap());
    assert!(!store.queue_review("a/0", -0.5).await.unwrap());
    assert!(matches!(
        store
            .settle(
                "a/0",
                &ann,
                2,
                2,
                &[1, 0, 0, 0],
                "majority",
                -0.5,
                &[],
                None
            )
            .await,
        Err(StoreError::FailedPrecondition(_))
    ));
    // An expert who marked the image does not review it; one reviewer holds it at a time.
    assert!(store.lease_review(&ann, 30_000).await.unwrap().is_none());
    let rl = store.lease_review(&rev, 30_000).await.unwrap().unwrap();
    assert_eq!((rl.image_id.as_str(), rl.kappa), ("a/0", -0.5));
    assert!(store.lease_review(&rev2, 30_000).await.unwrap().is_none());
    assert!(matches!(
        store
            .settle(
                "a/0",
                &rev2,
                2,
                2,
                &[1, 0, 0, 0],
                "own",
                -0.5,
                &[],
                Some(&rl.lease_id)
            )
            .await,
        Err(StoreError::PermissionDenied(_))
    ));
    assert!(matches!(
        store
            .settle(
                "a/0",
                &rev,
                3,
                1,
                &[1, 0, 0],
                "own",
                -0.5,
                &[],
                Some(&rl.lease_id)
            )
            .await,
        Err(StoreError::InvalidArgument(_))
    ));
    // Racing settlements of one review item: one wins, the others see it settled.
    let mut tasks = Vec::new();
    for k in 0..8i8 {
        let (s, lid, rev) = (store.clone(), rl.lease_id.clone(), rev.clone());
        tasks.push(tokio::spawn(async move {
            let from = vec!["m1".to_string(), "m2".to_string()];
            s.settle(
                "a/0",
                &rev,
                2,
                2,
                &[1, 0, 0, -k.signum()],
                "own",
                -0.5,
                &from,
                Some(&lid),
            )
            .await
            .unwrap()
        }));
    }
    let mut wins = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        if !r.duplicate {
            wins.push(r.clone());
        }
    }
    assert_eq!(wins.len(), 1, "{wins:?}");
    let settled = &wins[0];
    assert_eq!(
        store.settled_mark_of("a/0").await.unwrap().as_deref(),
        Some(settled.mark_id.as_str())
    );
    let sp = store.proposal(&settled.proposal_id).await.unwrap();
    assert!(sp.settled && !sp.provisional);
    assert_eq!(
        (sp.status.as_str(), sp.expert_id.as_str()),
        ("queued", rev.as_str())
    );
    assert_eq!(
        stream_len(&store, mp_store::REFINE_STREAM).await,
        refines + 1
    );
    // The settled proposal commits as any other.
    store
        .update_proposal(&settled.proposal_id, "ready", &[])
        .await
        .unwrap();
    assert_eq!(
        store
            .decide(&settled.proposal_id, &rev, true)
            .await
            .unwrap(),
        "committing"
    );
    assert_eq!(stream_len(&store, mp_store::COMMIT_STREAM).await, 1);

    // a/1 agrees: racing automatic settlements, one wins.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (s, bob) = (store.clone(), bob.clone());
        tasks.push(tokio::spawn(async move {
            s.settle("a/1", &bob, 2, 2, &[0, 0, 0, 0], "majority", 0.9, &[], None)
                .await
                .unwrap()
        }));
    }
    let mut n = 0;
    for t in tasks {
        let r = t.await.unwrap();
        n += usize::from(!r.duplicate);
        // A settled mark that marks nothing has nothing to learn: no proposal.
        assert!(r.proposal_id.is_empty());
    }
    assert_eq!(n, 1);
    assert!(!store.queue_review("a/1", 0.0).await.unwrap());
    let c = store.review_counts().await.unwrap();
    assert_eq!((c.unsettled, c.queued, c.leased, c.settled), (0, 0, 0, 2));
    assert_eq!(store.settled_marks().await.unwrap().len(), 2);
    // Neither expert's own mark is guidance; the settled ones are not experts' marks.
    assert!(store.guidance_marks().await.unwrap().is_empty());
    assert_eq!(store.marks_of_image("a/0").await.unwrap().len(), 2);
}

/// A review lease that runs out puts the image back in the review queue for the next
/// reviewer, and the first reviewer's late settlement is refused.
#[tokio::test]
async fn an_expired_review_lease_returns_the_image_to_the_review_queue() {
    let (_d, _s, store, _ann) = setup().await;
    let rev = store.create_expert("rev", Role::Reviewer).await.unwrap().0;
    let rev2 = store.create_expert("rev2", Role::Reviewer).await.unwrap().0;
    assert!(store.queue_review("a/2", 0.1).await.unwrap());
    let l = store.lease_review(&rev, 1).await.unwrap().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let l2 = store.lease_review(&rev2, 30_000).await.unwrap().unwrap();
    assert_eq!(l2.image_id, "a/2");
    assert_eq!(
        store.review_lease(&l.lease_id).await.unwrap().state,
        "expired"
    );
    assert!(matches!(
        store
            .settle(
                "a/2",
                &rev,
                2,
                2,
                &[1, 0, 0, 0],
                "own",
                0.1,
                &[],
                Some(&l.lease_id)
            )
            .await,
        Err(StoreError::FailedPrecondition(_))
    ));
    let s = store
        .settle(
            "a/2",
            &rev2,
            2,
            2,
            &[1, 0, 0, 0],
            "own",
            0.1,
            &[],
            Some(&l2.lease_id),
        )
        .await
        .unwrap();
    assert!(!s.duplicate && !s.proposal_id.is_empty());
}
