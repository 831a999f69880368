//! The deployment files, validated offline: they parse, reference only what they declare,
//! give trainer and workers a GPU, and every `mp` command line in them is accepted by the
//! binary's own argument parser.

use serde::Deserialize;
use serde_yaml::Value;
use std::path::PathBuf;
use std::process::Command;

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// `mp ARGS --help` succeeds only if every flag in ARGS exists.
fn assert_mp_accepts(args: &[String], origin: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_mp"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{origin}: mp {args:?} rejected: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn docker_compose_is_consistent() {
    let text = std::fs::read_to_string(deploy().join("docker-compose.yml")).unwrap();
    let doc: Value = serde_yaml::from_str(&text).unwrap();
    let services = doc["services"].as_mapping().unwrap();
    for name in ["redis", "init", "gateway", "trainer", "worker"] {
        assert!(services.contains_key(name), "service {name} missing");
    }
    let volumes = doc["volumes"].as_mapping().unwrap();
    assert!(strings(&doc["services"]["redis"]["command"])
        .join(" ")
        .contains("--appendfsync always"));
    for svc in ["gateway", "trainer", "worker"] {
        let s = &doc["services"][svc];
        let cmd = strings(&s["command"]);
        assert_mp_accepts(&cmd, &format!("compose {svc}"));
        for v in strings(&s["volumes"])
            .iter()
            .chain(strings(&doc["x-mp"]["volumes"]).iter())
        {
            let vol = v.split(':').next().unwrap();
            assert!(
                volumes.contains_key(vol),
                "{svc}: volume {vol} not declared"
            );
        }
    }
    // The admin token: the operator's, given to init only, never written by it anywhere.
    let init = &doc["services"]["init"];
    assert!(
        init["environment"]["MP_ADMIN_TOKEN"]
            .as_str()
            .is_some_and(|v| v.starts_with("${MP_ADMIN_TOKEN:?")),
        "init must take the admin token from the operator's environment"
    );
    let init_cmd = strings(&init["command"]).join(" ");
    assert!(
        init_cmd.contains("mp project init") && !init_cmd.contains('>'),
        "init's output must not be written to a volume: {init_cmd}"
    );
    for svc in ["gateway", "trainer", "worker"] {
        assert!(
            doc["services"][svc]["environment"]["MP_ADMIN_TOKEN"].is_null(),
            "{svc} has no business with the admin token"
        );
    }
    // Redis asks for a password; the platform's services are not root and cannot write
    // their own image.
    let redis_cmd = strings(&doc["services"]["redis"]["command"]).join(" ");
    for want in [
        "--user mp on >${MP_REDIS_PASSWORD",
        "-@dangerous",
        "noeviction",
    ] {
        assert!(redis_cmd.contains(want), "redis lacks {want}: {redis_cmd}");
    }
    assert!(doc["x-env"]["MP_REDIS_URL"]
        .as_str()
        .unwrap()
        .starts_with("redis://mp:${MP_REDIS_PASSWORD"));
    assert!(
        doc["services"]["redis"]["ports"].is_null(),
        "Redis stays on the compose network"
    );
    assert_eq!(doc["x-mp"]["user"], "10001:10001");
    assert_eq!(doc["x-mp"]["read_only"], true);
    for svc in ["trainer", "worker"] {
        let dev = &doc["services"][svc]["deploy"]["resources"]["reservations"]["devices"][0];
        assert_eq!(
            strings(&dev["capabilities"]),
            vec!["gpu"],
            "{svc} needs a GPU reservation"
        );
    }
}

#[test]
fn kubernetes_manifests_are_consistent() {
    let mut docs = Vec::new();
    for e in std::fs::read_dir(deploy().join("k8s")).unwrap() {
        let p = e.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        for d in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            docs.push((p.file_name().unwrap().to_string_lossy().into_owned(), v));
        }
    }
    let find = |kind: &str, name: &str| {
        docs.iter()
            .any(|(_, d)| d["kind"] == kind && d["metadata"]["name"] == name)
    };
    for (file, d) in &docs {
        assert!(
            d["apiVersion"].is_string()
                && d["kind"].is_string()
                && d["metadata"]["name"].is_string(),
            "{file}"
        );
        if d["kind"] != "Namespace" {
            assert_eq!(d["metadata"]["namespace"], "machine-punishment", "{file}");
        }
        let spec = &d["spec"]["template"]["spec"];
        if matches!(d["kind"].as_str(), Some("Deployment" | "StatefulSet")) {
            let sel = &d["spec"]["selector"]["matchLabels"];
            for (k, v) in sel.as_mapping().unwrap() {
                assert_eq!(
                    &d["spec"]["template"]["metadata"]["labels"][k.as_str().unwrap()],
                    v,
                    "{file}: selector does not match labels"
                );
            }
        }
        for vol in spec["volumes"].as_sequence().into_iter().flatten() {
            if let Some(claim) = vol["persistentVolumeClaim"]["claimName"].as_str() {
                assert!(
                    find("PersistentVolumeClaim", claim),
                    "{file}: PVC {claim} not declared"
                );
            }
            if let Some(cm) = vol["configMap"]["name"].as_str() {
                assert!(find("ConfigMap", cm), "{file}: ConfigMap {cm} not declared");
            }
        }
        for c in spec["containers"].as_sequence().into_iter().flatten() {
            if c["image"]
                .as_str()
                .is_some_and(|i| i.starts_with("machine-punishment"))
            {
                assert_mp_accepts(&strings(&c["args"]), file);
            }
        }
    }
    for name in ["trainer", "worker"] {
        let (_, d) = docs
            .iter()
            .find(|(_, d)| d["kind"] == "Deployment" && d["metadata"]["name"] == name)
            .unwrap();
        let spec = &d["spec"]["template"]["spec"];
        assert_eq!(
            spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"].as_u64(),
            Some(1),
            "{name} GPU"
        );
        assert!(spec["nodeSelector"].is_mapping(), "{name} node selector");
    }
    // The init Job takes the admin token from a Secret.
    let (_, job) = docs
        .iter()
        .find(|(_, d)| d["kind"] == "Job" && d["metadata"]["name"] == "mp-init")
        .unwrap();
    let env = &job["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_sequence()
            .into_iter()
            .flatten()
            .any(|e| e["name"] == "MP_ADMIN_TOKEN"
                && e["valueFrom"]["secretKeyRef"]["name"].is_string()),
        "the init Job takes MP_ADMIN_TOKEN from a Secret"
    );
    let (_, so) = docs
        .iter()
        .find(|(_, d)| d["kind"] == "ScaledObject")
        .unwrap();
    assert!(find(
        "Deployment",
        so["spec"]["scaleTargetRef"]["name"].as_str().unwrap()
    ));
    assert_eq!(
        so["spec"]["triggers"][0]["metadata"]["stream"],
        "mp:jobs:refine"
    );
    assert_eq!(
        so["spec"]["triggers"][0]["metadata"]["consumerGroup"],
        "refine"
    );
    assert!(
        find("StatefulSet", "redis")
            && find("Service", "gateway")
            && find("PersistentVolumeClaim", "checkpoints")
    );
    // The gateway's config file parses with the gateway's own loader.
    let (_, cm) = docs.iter().find(|(_, d)| d["kind"] == "ConfigMap").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.toml");
    std::fs::write(&p, cm["data"]["gateway.toml"].as_str().unwrap()).unwrap();
    mp_gateway::GatewayConfig::load(Some(&p)).unwrap();
}

/// Every Kubernetes manifest against the Kubernetes 1.37 schemas, strictly (unknown fields
/// refused), with `kubernetes-validate` (installed into the venv by deploy/setup.sh; it
/// bundles the schemas and works offline). KEDA's kinds have no bundled schema: the test
/// above checks them.
#[test]
fn kubernetes_manifests_pass_the_kubernetes_schemas() {
    let python = std::env::var("MP_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy().join("k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let out = Command::new(&python)
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--kubernetes-version",
            "1.37.0",
        ])
        .args(&files)
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e} (deploy/setup.sh installs kubernetes-validate)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let passed = text.matches(" passed for resource ").count();
    assert!(passed >= 13, "{passed} resources validated:\n{text}");
    for line in text.lines().filter(|l| l.starts_with("WARN")) {
        assert!(line.contains("keda.sh"), "{line}");
    }
}

/// Production settings of every workload: not root, read-only root filesystem, no privilege
/// escalation, every capability dropped, CPU and memory limits, pinned image tags; Redis's
/// URL (it carries the password) only from a Secret; only the platform's pods reach Redis.
#[test]
fn every_workload_runs_unprivileged_bounded_and_pinned() {
    let mut docs = Vec::new();
    for e in std::fs::read_dir(deploy().join("k8s")).unwrap() {
        let p = e.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        for d in serde_yaml::Deserializer::from_str(&text) {
            docs.push((
                p.file_name().unwrap().to_string_lossy().into_owned(),
                Value::deserialize(d).unwrap(),
            ));
        }
    }
    let mut workloads = 0;
    for (file, d) in &docs {
        if d["kind"] == "ConfigMap" {
            let text = serde_yaml::to_string(&d["data"]).unwrap();
            assert!(
                !text.contains("MP_REDIS_URL") && !text.contains("redis://"),
                "{file}: the Redis URL belongs in a Secret"
            );
        }
        if !matches!(
            d["kind"].as_str(),
            Some("Deployment" | "StatefulSet" | "Job")
        ) {
            continue;
        }
        workloads += 1;
        let pod = &d["spec"]["template"];
        let spec = &pod["spec"];
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{file}");
        let ours = spec["containers"][0]["image"]
            .as_str()
            .unwrap()
            .starts_with("machine-punishment");
        if ours {
            assert_eq!(
                pod["metadata"]["labels"]["app.kubernetes.io/part-of"], "machine-punishment",
                "{file}: Redis lets in only the platform's pods"
            );
        }
        for c in spec["containers"].as_sequence().unwrap() {
            let image = c["image"].as_str().unwrap();
            let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
            assert!(
                !tag.is_empty() && tag != "latest",
                "{file}: image {image} is not pinned"
            );
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{file}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{file}");
            assert_eq!(strings(&sc["capabilities"]["drop"]), vec!["ALL"], "{file}");
            let limits = &c["resources"]["limits"];
            assert!(
                limits["memory"].is_string() && !limits["cpu"].is_null(),
                "{file}: CPU and memory limits"
            );
            if ours {
                let env = c["env"].as_sequence().cloned().unwrap_or_default();
                assert!(
                    env.iter().any(|e| e["name"] == "MP_REDIS_URL"
                        && e["valueFrom"]["secretKeyRef"]["name"].is_string()),
                    "{file}: MP_REDIS_URL from a Secret"
                );
            }
        }
    }
    assert_eq!(workloads, 5, "gateway, trainer, worker, redis, init");
    let (_, policy) = docs
        .iter()
        .find(|(_, d)| d["kind"] == "NetworkPolicy")
        .expect("a NetworkPolicy in front of Redis");
    assert_eq!(policy["spec"]["podSelector"]["matchLabels"]["app"], "redis");
    let (_, redis) = docs
        .iter()
        .find(|(_, d)| d["kind"] == "StatefulSet" && d["metadata"]["name"] == "redis")
        .unwrap();
    let args = strings(&redis["spec"]["template"]["spec"]["containers"][0]["args"]).join(" ");
    for want in [
        "--user mp on",
        "-@dangerous",
        "--maxmemory-policy noeviction",
    ] {
        assert!(args.contains(want), "redis args lack {want}: {args}");
    }
}
