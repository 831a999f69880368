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
