//! The Kubernetes manifests (`k8s/base`, a kustomize base), the image recipe
//! (`k8s/image/Containerfile`) and the shipped alert rules stay parseable, agree with each other
//! and with the binary, and keep the properties operators rely on.

use serde_yaml::Value;

const BASE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/k8s/base");

fn docs() -> Vec<(String, Value)> {
    let dir = BASE;
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

/// The Deployments of the base, by name.
fn deployments(docs: &[(String, Value)]) -> Vec<(&str, &Value)> {
    docs.iter()
        .filter(|(_, d)| d["kind"] == "Deployment")
        .map(|(_, d)| (d["metadata"]["name"].as_str().unwrap(), d))
        .collect()
}

#[test]
fn the_kustomization_names_every_manifest_but_the_secret_template() {
    let k: Value = serde_yaml::from_str(
        &std::fs::read_to_string(format!("{BASE}/kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let listed: std::collections::BTreeSet<&str> = k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|r| r.as_str())
        .collect();
    let mut present = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(BASE).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            present.insert(name);
        }
    }
    let expected: std::collections::BTreeSet<&str> = present
        .iter()
        .map(String::as_str)
        .filter(|n| *n != "secret-template.yaml")
        .collect();
    assert_eq!(listed, expected);
}

#[test]
fn every_container_runs_unprivileged_with_requests_and_limits() {
    let docs = docs();
    for (name, d) in deployments(&docs) {
        let pod = &d["spec"]["template"]["spec"];
        for c in pod["containers"].as_sequence().unwrap() {
            let sc = &c["securityContext"];
            assert_eq!(sc["runAsNonRoot"], true, "{name}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(sc["capabilities"]["drop"][0], "ALL", "{name}");
            assert_eq!(sc["runAsUser"], 65532, "{name}: the image's user");
            for kind in ["requests", "limits"] {
                for resource in ["cpu", "memory"] {
                    assert!(
                        c["resources"][kind].get(resource).is_some(),
                        "{name}: no {resource} {kind}"
                    );
                }
            }
            // A read-only root: whatever the process writes goes to a mounted volume.
            let mounts: Vec<&str> = c["volumeMounts"]
                .as_sequence()
                .unwrap()
                .iter()
                .filter_map(|m| m["mountPath"].as_str())
                .collect();
            assert!(mounts.contains(&"/tmp"), "{name}: no writable /tmp");
        }
        assert_eq!(
            pod["securityContext"]["fsGroup"], 65532,
            "{name}: volumes writable by the image's user"
        );
    }
}

#[test]
fn every_secret_key_a_pod_reads_is_in_the_secret_template_and_no_other() {
    let docs = docs();
    let template = docs
        .iter()
        .find(|(f, d)| {
            f.ends_with("secret-template.yaml") && d["metadata"]["name"] == "herald-secrets"
        })
        .map(|(_, d)| d)
        .expect("herald-secrets in secret-template.yaml");
    let offered: std::collections::BTreeSet<&str> = template["stringData"]
        .as_mapping()
        .unwrap()
        .keys()
        .filter_map(|k| k.as_str())
        .collect();
    let mut read = std::collections::BTreeSet::new();
    for (_, d) in deployments(&docs) {
        for c in d["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .unwrap()
        {
            for e in c["env"].as_sequence().into_iter().flatten() {
                let r = &e["valueFrom"]["secretKeyRef"];
                if r["name"] == "herald-secrets" {
                    read.insert(r["key"].as_str().unwrap());
                }
            }
        }
    }
    assert_eq!(read, offered);
}

#[test]
fn disruption_budgets_and_autoscalers_cover_each_deployment_within_the_partition_count() {
    let docs = docs();
    let partitions = herald::topology::Topology::embedded().unwrap().partitions() as i64;
    for (name, d) in deployments(&docs) {
        let pod_labels = &d["spec"]["template"]["metadata"]["labels"];
        let pdb = docs
            .iter()
            .find(|(_, p)| p["kind"] == "PodDisruptionBudget" && p["metadata"]["name"] == name)
            .map(|(_, p)| p)
            .unwrap_or_else(|| panic!("no PodDisruptionBudget for {name}"));
        assert_eq!(
            &pdb["spec"]["selector"]["matchLabels"], pod_labels,
            "{name}"
        );
        let args = container_args(&d["spec"]["template"]["spec"]["containers"][0]);
        if args[0] == "run" {
            // A consumer beyond the partition count would own no partition: scale on lag, up
            // to that count, with the lag of this stage.
            let stage = args[args.iter().position(|a| *a == "--stage").unwrap() + 1];
            let so = docs
                .iter()
                .find(|(_, s)| {
                    s["kind"] == "ScaledObject" && s["spec"]["scaleTargetRef"]["name"] == name
                })
                .map(|(_, s)| s)
                .unwrap_or_else(|| panic!("no ScaledObject for {name}"));
            let max = so["spec"]["maxReplicaCount"].as_i64().unwrap();
            assert!(
                max <= partitions,
                "{name}: {max} replicas for {partitions} partitions"
            );
            let query = so["spec"]["triggers"][0]["metadata"]["query"]
                .as_str()
                .unwrap();
            assert!(
                query.contains("herald_consumer_lag")
                    && query.contains(&format!("stage=\"{stage}\"")),
                "{name}: {query}"
            );
            assert!(
                d["spec"]["replicas"].as_i64().unwrap() <= max,
                "{name}: more replicas than partitions"
            );
        } else {
            assert!(
                docs.iter()
                    .any(|(_, h)| h["kind"] == "HorizontalPodAutoscaler"
                        && h["spec"]["scaleTargetRef"]["name"] == name),
                "no autoscaler for {name}"
            );
        }
    }
}

#[test]
fn the_image_recipe_builds_in_stages_and_runs_as_the_manifests_user_on_their_ports() {
    let recipe = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/k8s/image/Containerfile"
    ))
    .unwrap();
    let lines: Vec<&str> = recipe.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(
        lines.iter().filter(|l| l.starts_with("FROM ")).count() >= 2,
        "a build stage and a runtime stage"
    );
    let last_from = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    let runtime = &lines[last_from..];
    assert!(
        runtime.iter().any(|l| l.starts_with("USER 65532")),
        "the runtime stage runs as the manifests' runAsUser"
    );
    assert!(
        runtime
            .iter()
            .any(|l| l.starts_with("ENTRYPOINT") && l.contains("herald")),
        "the entrypoint is the herald binary"
    );
    let exposed: Vec<i64> = runtime
        .iter()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|p| p.split_whitespace())
        .filter_map(|p| p.parse().ok())
        .collect();
    let docs = docs();
    for (name, d) in deployments(&docs) {
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        for port in c["ports"].as_sequence().unwrap() {
            let n = port["containerPort"].as_i64().unwrap();
            assert!(
                exposed.contains(&n),
                "{name}: port {n} is not exposed by the image"
            );
        }
        // The scrape annotation names the metrics port.
        let metrics = c["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "metrics")
            .unwrap()["containerPort"]
            .as_i64()
            .unwrap();
        assert_eq!(
            d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
            metrics.to_string(),
            "{name}"
        );
    }
    // What the recipe copies is what the build reads.
    for dir in ["processors", "schemas", "topology"] {
        assert!(
            lines.iter().any(|l| l.starts_with(&format!("COPY {dir} "))),
            "the build needs {dir}/"
        );
    }
}

#[test]
fn every_alert_names_a_runbook_entry_in_the_readme() {
    let root = env!("CARGO_MANIFEST_DIR");
    let rules: Value = serde_yaml::from_str(
        &std::fs::read_to_string(format!("{root}/k8s/observability/alerts.yaml")).unwrap(),
    )
    .unwrap();
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    for group in rules["spec"]["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let alert = rule["alert"].as_str().unwrap();
            let runbook = rule["annotations"]["runbook"].as_str().unwrap_or_default();
            let anchor = runbook
                .strip_prefix("README.md#")
                .unwrap_or_else(|| panic!("{alert}: runbook {runbook:?} is not a README anchor"));
            assert!(
                readme.contains(&format!("<a id=\"{anchor}\"></a>")),
                "{alert}: the README has no runbook entry {anchor}"
            );
        }
    }
}

#[test]
fn both_kustomizations_render_with_kubectl() {
    // kubectl renders a kustomization without a cluster. Where it is not installed, the checks
    // above still hold; this one says so and stops.
    let installed = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        eprintln!("kubectl is not installed: the kustomizations were not rendered");
        return;
    }
    let render = |dir: &str| -> Vec<Value> {
        let o = std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(format!("{}/{dir}", env!("CARGO_MANIFEST_DIR")))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "kubectl kustomize {dir}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_yaml::Deserializer::from_str(&String::from_utf8_lossy(&o.stdout))
            .map(|d| Value::deserialize(d).unwrap())
            .collect()
    };
    let kinds = |docs: &[Value]| -> Vec<String> {
        let mut k: Vec<String> = docs
            .iter()
            .map(|d| d["kind"].as_str().unwrap_or_default().to_string())
            .collect();
        k.sort();
        k
    };
    let base = render("k8s/base");
    assert_eq!(
        kinds(&base),
        [
            "ConfigMap",
            "Deployment",
            "Deployment",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "PodDisruptionBudget",
            "PodDisruptionBudget",
            "ScaledObject",
            "ScaledObject",
            "Service",
            "Service"
        ]
    );
    // The kustomization's label reaches every object, and no Secret is applied.
    for d in &base {
        assert_eq!(
            d["metadata"]["labels"]["app.kubernetes.io/part-of"], "herald",
            "{:?}",
            d["metadata"]["name"]
        );
    }
    let observability = render("k8s/observability");
    assert_eq!(kinds(&observability), ["ConfigMap", "PrometheusRule"]);
    let dashboard = observability
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .unwrap();
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json = dashboard["data"]["herald.json"]
        .as_str()
        .expect("the dashboard file");
    let parsed: serde_json::Value = serde_json::from_str(json).expect("the dashboard is JSON");
    assert_eq!(parsed["uid"], "herald");
}
