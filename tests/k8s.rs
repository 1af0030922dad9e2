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
        let args: Vec<&str> = c["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
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
