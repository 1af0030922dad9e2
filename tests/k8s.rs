//! The Kubernetes manifests stay parseable and keep the properties operators rely on.

use serde_yaml::Value;

fn docs() -> Vec<(String, Value)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/k8s");
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            for d in serde_yaml::Deserializer::from_str(&text) {
                let v = Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                out.push((path.display().to_string(), v));
            }
        }
    }
    out
}

use serde::Deserialize;

/// A container's `args`, the command line after `herald`.
fn container_args(c: &Value) -> Vec<&str> {
    c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect()
}

#[test]
fn every_deployment_has_probes_on_its_metrics_port_and_a_grace_period() {
    let docs = docs();
    let deployments: Vec<_> = docs
        .iter()
        .filter(|(_, d)| d["kind"] == "Deployment")
        .collect();
    let names: Vec<&str> = deployments
        .iter()
        .filter_map(|(_, d)| d["metadata"]["name"].as_str())
        .collect();
    assert!(
        names.contains(&"herald-processors") && names.contains(&"herald-dispatch"),
        "{names:?}"
    );
    for (file, d) in deployments {
        let spec = &d["spec"]["template"]["spec"];
        assert!(
            spec["terminationGracePeriodSeconds"].as_i64().unwrap_or(0) >= 30,
            "{file}: grace period too short to finish a transaction"
        );
        let c = &spec["containers"][0];
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{file}: {probe}");
        }
        assert!(
            c["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "metrics"),
            "{file}"
        );
        assert_eq!(
            d["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"],
            "{file}: selector must match pod labels"
        );
        let args = container_args(c);
        let command = if d["metadata"]["name"] == "herald-gateway" {
            "gateway"
        } else {
            "run"
        };
        assert_eq!(args[0], command, "{file}");
    }
}

#[test]
fn the_gateway_service_reaches_the_gateway_pods_webhook_port() {
    let docs = docs();
    let service = docs
        .iter()
        .find(|(_, d)| d["kind"] == "Service" && d["metadata"]["name"] == "herald-gateway")
        .map(|(_, d)| d)
        .expect("the herald-gateway Service");
    let gateway = docs
        .iter()
        .find(|(_, d)| d["kind"] == "Deployment" && d["metadata"]["name"] == "herald-gateway")
        .map(|(_, d)| d)
        .expect("the herald-gateway Deployment");
    assert_eq!(
        service["spec"]["selector"],
        gateway["spec"]["template"]["metadata"]["labels"]
    );
    let target = &service["spec"]["ports"][0]["targetPort"];
    assert!(
        gateway["spec"]["template"]["spec"]["containers"][0]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|p| &p["name"] == target)
    );
}

/// The environment a Deployment's container starts with: the ConfigMap it names, then its own
/// entries. A Secret key gets a placeholder (`None` when the key is optional, as a Secret
/// without it would leave the variable unset); a field reference gets the pod's name.
fn container_env(docs: &[(String, Value)], c: &Value) -> Vec<(String, Option<String>)> {
    let mut env = Vec::new();
    for from in c["envFrom"].as_sequence().into_iter().flatten() {
        let name = &from["configMapRef"]["name"];
        let map = docs
            .iter()
            .find(|(_, d)| d["kind"] == "ConfigMap" && &d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no ConfigMap {name:?}"));
        for (k, v) in map.1["data"].as_mapping().unwrap() {
            env.push((
                k.as_str().unwrap().to_string(),
                v.as_str().map(str::to_string),
            ));
        }
    }
    for e in c["env"].as_sequence().into_iter().flatten() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = e["value"].as_str() {
            Some(v.to_string())
        } else if e["valueFrom"]["secretKeyRef"]["optional"] == true {
            None
        } else if e["valueFrom"].get("secretKeyRef").is_some() {
            Some(secret_placeholder(&name))
        } else {
            Some("herald-pod-0".to_string())
        };
        env.push((name, value));
    }
    env
}

/// A value of the right shape for a required secret, so the start gets past its checks.
fn secret_placeholder(name: &str) -> String {
    match name {
        "HERALD_PHONE_NUMBER_ID" => "1055501234567890".into(),
        _ => "a-placeholder-secret-of-enough-length-0123456789".into(),
    }
}

/// The names a command reads from the environment, as its `--help` lists them.
fn env_names(command: &str) -> Vec<String> {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([command, "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&o.stdout).into_owned();
    help.split("[env: ")
        .skip(1)
        // `[env: NAME=value]`, or `[env: NAME]` for a secret whose value help hides.
        .filter_map(|s| s.split(['=', ']']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn every_deployment_starts_with_the_arguments_and_environment_its_manifest_gives() {
    let docs = docs();
    let mut known_anywhere = std::collections::HashSet::new();
    for (file, d) in docs.iter().filter(|(_, d)| d["kind"] == "Deployment") {
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        let args = container_args(c);
        let env = container_env(&docs, c);
        let known = env_names(args[0]);
        known_anywhere.extend(known.iter().cloned());
        // Every variable the container sets itself is one its command reads: a renamed flag
        // would otherwise leave a setting silently ignored.
        for e in c["env"].as_sequence().into_iter().flatten() {
            let name = e["name"].as_str().unwrap();
            assert!(
                known.iter().any(|k| k == name),
                "{file}: `herald {}` does not read {name}",
                args[0]
            );
        }
        // Started as the pod starts it (no other environment): it must get past its argument
        // checks. A rejected or missing argument exits 2 at once; past them, it fails to reach
        // the cluster's services (exit 1) or is still trying.
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.args(&args)
            .env_clear()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (k, v) in &env {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        assert!(
            status.is_none_or(|s| s.code() != Some(2)),
            "{file}: `herald {}` refuses what the manifest gives it:\n{stderr}",
            args.join(" ")
        );
    }
    // The shared ConfigMap, and the settings its comments offer, name only variables some
    // Herald command reads.
    let (file, map) = docs
        .iter()
        .find(|(_, d)| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "herald-config")
        .expect("the herald-config ConfigMap");
    let text = std::fs::read_to_string(file).unwrap();
    let offered = text
        .lines()
        .map(|l| l.trim_start_matches([' ', '#']))
        .filter_map(|l| l.split_once(':').map(|(k, _)| k))
        .filter(|k| k.starts_with("HERALD_"));
    for name in map["data"]
        .as_mapping()
        .unwrap()
        .keys()
        .filter_map(|k| k.as_str())
        .chain(offered)
    {
        assert!(
            known_anywhere.contains(name),
            "{file}: no Herald command reads {name}"
        );
    }
}
