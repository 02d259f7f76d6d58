//! The deployment artefacts under `deploy/` agree with the binary: every manifest parses, the
//! configs they embed load through the real loader, and ports, probes, mounts, the command line,
//! the hardening settings and the systemd unit match what that config says.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meetgate::config::Config;
use serde::Deserialize;
use serde_yaml_ng::Value;

const BIN: &str = env!("CARGO_BIN_EXE_meetgate");
/// Where every artefact puts the config, and the command line that runs it.
const CONFIG_PATH: &str = "/etc/meetgate/meetgate.toml";
const ARGV: [&str; 4] = ["/usr/local/bin/meetgate", "run", "--config", CONFIG_PATH];

static NULL: Value = Value::Null;

fn path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `v.a.b.c`; `Null` when any step is missing.
fn at<'a>(v: &'a Value, dotted: &str) -> &'a Value {
    dotted
        .split('.')
        .try_fold(v, |v, key| v.get(key))
        .unwrap_or(&NULL)
}

fn text<'a>(v: &'a Value, dotted: &str) -> &'a str {
    at(v, dotted)
        .as_str()
        .unwrap_or_else(|| panic!("{dotted} is not a string in {v:?}"))
}

fn list<'a>(v: &'a Value, dotted: &str) -> &'a [Value] {
    at(v, dotted).as_sequence().map_or(&[], Vec::as_slice)
}

fn strings(v: &Value, dotted: &str) -> Vec<String> {
    list(v, dotted)
        .iter()
        .map(|s| s.as_str().expect("a string").to_owned())
        .collect()
}

/// Every document of a multi-document YAML file, each with apiVersion, kind and a name.
struct Manifest {
    file: &'static str,
    docs: Vec<Value>,
}

impl Manifest {
    fn load(file: &'static str) -> Manifest {
        let text = read(file);
        let mut docs = Vec::new();
        for de in serde_yaml_ng::Deserializer::from_str(&text) {
            let doc = Value::deserialize(de).unwrap_or_else(|e| panic!("{file}: {e}"));
            if doc.is_null() {
                continue;
            }
            for key in ["apiVersion", "kind", "metadata.name"] {
                assert!(
                    at(&doc, key).as_str().is_some_and(|s| !s.is_empty()),
                    "{file}: a document without {key}: {doc:?}"
                );
            }
            docs.push(doc);
        }
        assert!(!docs.is_empty(), "{file} holds no documents");
        Manifest { file, docs }
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs
            .iter()
            .filter(|d| text(d, "kind") == kind)
            .collect()
    }

    fn only(&self, kind: &str) -> &Value {
        let found = self.all(kind);
        assert_eq!(found.len(), 1, "{}: one {kind} expected", self.file);
        found[0]
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.all(kind)
            .into_iter()
            .find(|d| text(d, "metadata.name") == name)
            .unwrap_or_else(|| panic!("{}: no {kind} named {name}", self.file))
    }
}

/// Every `k: v` of `selector` is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let Some(selector) = selector.as_mapping() else {
        return false;
    };
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn port_number(container: &Value, port: &Value) -> u16 {
    if let Some(n) = port.as_u64() {
        return u16::try_from(n).expect("a port number");
    }
    let name = port.as_str().expect("a port number or name");
    list(container, "ports")
        .iter()
        .find(|p| at(p, "name").as_str() == Some(name))
        .and_then(|p| at(p, "containerPort").as_u64())
        .and_then(|n| u16::try_from(n).ok())
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

fn seconds(v: &Value) -> u64 {
    v.as_u64().expect("a whole number of seconds")
}

/// A self-signed certificate and its key, for `[tls]` files named by a manifest.
fn tls_pair() -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec!["meetgate".to_owned()]).expect("cert");
    (c.cert.pem(), c.key_pair.serialize_pem())
}

/// The secret files a config names (app and client key files, TLS files), and its key
/// environment variables.
fn secret_inputs(raw: &toml::Table) -> (Vec<(String, &'static str)>, Vec<String>) {
    let mut files = Vec::new();
    let mut vars = Vec::new();
    for section in ["apps", "clients"] {
        let entries = raw.get(section).and_then(toml::Value::as_array);
        for entry in entries.into_iter().flatten() {
            if let Some(f) = entry.get("app_key_file").and_then(toml::Value::as_str) {
                files.push((f.to_owned(), "key"));
            }
            if let Some(v) = entry.get("app_key_env").and_then(toml::Value::as_str) {
                vars.push(v.to_owned());
            }
        }
    }
    if let Some(tls) = raw.get("tls") {
        for (field, kind) in [("cert_file", "cert"), ("key_file", "tls-key")] {
            if let Some(f) = tls.get(field).and_then(toml::Value::as_str) {
                files.push((f.to_owned(), kind));
            }
        }
    }
    (files, vars)
}

/// Loads `toml_text` through the real loader, with every secret file it names replaced by a
/// temporary one and every key variable set.
fn load_with_dummies(
    toml_text: &str,
    mut env: HashMap<String, String>,
    dir: &Path,
) -> (Config, toml::Table) {
    let raw: toml::Table = toml_text.parse().expect("the config is TOML");
    let (files, vars) = secret_inputs(&raw);
    let (cert, key) = tls_pair();
    let mut text = toml_text.to_owned();
    for (i, (file, kind)) in files.iter().enumerate() {
        let temp = dir.join(format!("secret-{i}"));
        let content = match *kind {
            "cert" => cert.clone(),
            "tls-key" => key.clone(),
            _ => format!("dummy-key-{i}\n"),
        };
        std::fs::write(&temp, content).expect("write");
        text = text.replace(&format!("\"{file}\""), &format!("\"{}\"", temp.display()));
    }
    for var in vars {
        env.insert(var, "dummy-env-key".into());
    }
    let config = meetgate::config::load_str(&text, &env)
        .unwrap_or_else(|e| panic!("the config does not load:\n{e}\n---\n{toml_text}"));
    (config, raw)
}

/// What [`check_meetgate_pod`] found.
struct Pod<'a> {
    spec: &'a Value,
    labels: &'a Value,
    container: &'a Value,
    config: Config,
    raw: toml::Table,
}

/// The checks every pod running meetgate must pass; `sidecar`: a native sidecar.
fn check_meetgate_pod<'a>(m: &'a Manifest, workload: &'a Value, sidecar: bool) -> Pod<'a> {
    let file = m.file;
    let spec = at(workload, "spec.template.spec");
    let labels = at(workload, "spec.template.metadata.labels");
    assert!(
        selects(at(workload, "spec.selector.matchLabels"), labels),
        "{file}: the selector must match the pod's labels"
    );
    let (in_init, container) = list(spec, "initContainers")
        .iter()
        .map(|c| (true, c))
        .chain(list(spec, "containers").iter().map(|c| (false, c)))
        .find(|(_, c)| at(c, "name").as_str() == Some("meetgate"))
        .unwrap_or_else(|| panic!("{file}: no container named meetgate"));
    if sidecar {
        assert!(in_init, "{file}: a native sidecar is an init container");
        assert_eq!(
            at(container, "restartPolicy").as_str(),
            Some("Always"),
            "{file}: a native sidecar has restartPolicy: Always"
        );
    } else {
        assert!(!in_init, "{file}: the gateway is a regular container");
    }

    // The command line, explicit, and the same as the image's default.
    let argv: Vec<String> = [strings(container, "command"), strings(container, "args")].concat();
    assert_eq!(argv, ARGV, "{file}: meetgate's command and args");

    // Volumes, by mount path; no subPath (the kubelet never updates subPath mounts).
    let volume = |mount_path: &str| -> (&Value, &Value) {
        let mount = list(container, "volumeMounts")
            .iter()
            .find(|v| text(v, "mountPath") == mount_path)
            .unwrap_or_else(|| panic!("{file}: nothing mounted at {mount_path}"));
        assert!(
            at(mount, "subPath").is_null(),
            "{file}: {mount_path} uses subPath"
        );
        assert_eq!(
            at(mount, "readOnly").as_bool(),
            Some(true),
            "{file}: {mount_path} read-only"
        );
        let name = text(mount, "name");
        let vol = list(spec, "volumes")
            .iter()
            .find(|v| text(v, "name") == name)
            .unwrap_or_else(|| panic!("{file}: no volume {name}"));
        (mount, vol)
    };

    // The config: a ConfigMap key mounted where --config points.
    let (dir, name) = CONFIG_PATH.rsplit_once('/').expect("a path");
    let (_, vol) = volume(dir);
    let map = m.named("ConfigMap", text(vol, "configMap.name"));
    let toml_text = at(map, "data")
        .get(name)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{file}: ConfigMap without {name}"));

    // Environment overrides: literal values, or Secret keys from this manifest.
    let mut env = HashMap::new();
    for var in list(container, "env") {
        let key = text(var, "name");
        let value = if let Some(v) = at(var, "value").as_str() {
            v.to_owned()
        } else {
            let secret = m.named("Secret", text(var, "valueFrom.secretKeyRef.name"));
            let k = text(var, "valueFrom.secretKeyRef.key");
            at(secret, "stringData")
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("{file}: Secret without {k}"))
                .to_owned()
        };
        env.insert(key.to_owned(), value);
    }

    // Every secret file the config names comes from a Secret volume of this manifest, mounted
    // read-only at the file's directory, not world-readable, holding that file name.
    let raw: toml::Table = toml_text.parse().expect("TOML");
    for (secret_file, _) in secret_inputs(&raw).0 {
        let (dir, key) = secret_file.rsplit_once('/').expect("an absolute path");
        let (_, vol) = volume(dir);
        let secret_name = at(vol, "secret.secretName")
            .as_str()
            .unwrap_or_else(|| panic!("{file}: {dir} is not a Secret volume"));
        assert!(
            at(vol, "secret.items").is_null(),
            "{file}: {secret_name} uses items"
        );
        let mode = at(vol, "secret.defaultMode").as_u64().unwrap_or(0o644);
        assert_eq!(mode & 0o007, 0, "{file}: {secret_name} is world-readable");
        let secret = m.named("Secret", secret_name);
        assert!(
            !at(secret, "stringData").get(key).unwrap_or(&NULL).is_null(),
            "{file}: Secret {secret_name} has no key {key} (for {secret_file})"
        );
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let (config, raw) = load_with_dummies(toml_text, env, dir.path());

    // Ports: exactly the two listeners.
    let ports: BTreeSet<u16> = list(container, "ports")
        .iter()
        .map(|p| port_number(container, at(p, "containerPort")))
        .collect();
    let (proxy, admin) = (config.listen.port(), config.admin_listen.port());
    assert_eq!(
        ports,
        BTreeSet::from([proxy, admin]),
        "{file}: container ports"
    );
    assert!(
        config.admin_listen.ip().is_unspecified(),
        "{file}: the kubelet probes the pod IP, so admin_listen must be 0.0.0.0 or [::]"
    );

    // Probes: plain HTTP on the admin port.
    for (probe, paths) in [
        ("readinessProbe", &["/readyz"][..]),
        ("livenessProbe", &["/healthz"][..]),
        ("startupProbe", &["/healthz", "/readyz"][..]),
    ] {
        let p = at(container, probe);
        if p.is_null() && probe == "startupProbe" {
            continue;
        }
        let path = text(p, "httpGet.path");
        assert!(paths.contains(&path), "{file}: {probe} path {path}");
        assert_eq!(
            port_number(container, at(p, "httpGet.port")),
            admin,
            "{file}: {probe} port"
        );
        assert!(
            matches!(at(p, "httpGet.scheme").as_str(), None | Some("HTTP")),
            "{file}: the admin listener is plain HTTP"
        );
    }

    // Hardening.
    let sc = at(container, "securityContext");
    assert_eq!(
        at(sc, "runAsNonRoot").as_bool(),
        Some(true),
        "{file}: runAsNonRoot"
    );
    assert!(
        at(sc, "runAsUser").as_u64().is_some_and(|u| u != 0),
        "{file}: runAsUser"
    );
    assert_eq!(
        at(sc, "allowPrivilegeEscalation").as_bool(),
        Some(false),
        "{file}: allowPrivilegeEscalation"
    );
    assert_eq!(
        at(sc, "readOnlyRootFilesystem").as_bool(),
        Some(true),
        "{file}: readOnlyRootFilesystem"
    );
    assert_eq!(
        strings(sc, "capabilities.drop"),
        ["ALL"],
        "{file}: capabilities"
    );
    assert_eq!(
        at(sc, "seccompProfile.type").as_str(),
        Some("RuntimeDefault"),
        "{file}: seccompProfile"
    );
    assert_eq!(
        at(spec, "automountServiceAccountToken").as_bool(),
        Some(false),
        "{file}: meetgate needs no Kubernetes API token"
    );
    for res in [
        "requests.cpu",
        "requests.memory",
        "limits.cpu",
        "limits.memory",
    ] {
        assert!(
            !at(container, &format!("resources.{res}")).is_null(),
            "{file}: resources.{res}"
        );
    }

    // Shutdown: the pod's grace period covers any preStop pause plus shutdown_grace.
    let grace = at(spec, "terminationGracePeriodSeconds");
    let grace = if grace.is_null() { 30 } else { seconds(grace) };
    let pre_stop = at(container, "lifecycle.preStop.sleep.seconds");
    let pre_stop = if pre_stop.is_null() {
        0
    } else {
        seconds(pre_stop)
    };
    assert!(
        Duration::from_secs(grace) > Duration::from_secs(pre_stop) + config.shutdown_grace,
        "{file}: terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop}s + shutdown_grace {:?}",
        config.shutdown_grace
    );

    Pod {
        spec,
        labels,
        container,
        config,
        raw,
    }
}

/// deploy/container/meetgate.toml, loaded.
fn container_config() -> Config {
    let dir = tempfile::tempdir().expect("tempdir");
    load_with_dummies(
        &read("deploy/container/meetgate.toml"),
        HashMap::new(),
        dir.path(),
    )
    .0
}

#[test]
fn sidecar_manifest_matches_its_config() {
    let m = Manifest::load("deploy/kubernetes/sidecar.yaml");
    let pod = check_meetgate_pod(&m, m.only("Deployment"), true);
    let c = &pod.config;
    assert!(c.listen.ip().is_loopback(), "a sidecar listens on loopback");
    assert!(c.clients.is_empty(), "a sidecar needs no clients");

    // The app reaches the proxy on the pod's loopback at the configured port.
    let target = format!("127.0.0.1:{}", c.listen.port());
    let app_uses_it = list(pod.spec, "containers").iter().any(|app| {
        [strings(app, "command"), strings(app, "args")]
            .concat()
            .iter()
            .any(|a| a.contains(&target))
    });
    assert!(app_uses_it, "the example app calls http://{target}");

    // The image's expected config (and so its EXPOSE) has the same listeners.
    let image = container_config();
    assert_eq!(
        (c.listen, c.admin_listen),
        (image.listen, image.admin_listen)
    );
}

#[test]
fn gateway_manifest_matches_its_config() {
    let m = Manifest::load("deploy/kubernetes/gateway.yaml");
    let deployment = m.only("Deployment");
    let pod = check_meetgate_pod(&m, deployment, false);
    let c = &pod.config;
    let (proxy, admin) = (c.listen.port(), c.admin_listen.port());
    assert!(
        c.listen.ip().is_unspecified(),
        "the gateway listens on all interfaces"
    );
    assert!(
        !c.clients.is_empty(),
        "every caller of the gateway authenticates"
    );
    if c.clients.iter().any(|cl| cl.sdk.is_some()) {
        assert!(c.tls.is_some(), "SDK clients sign in only over HTTPS");
    }

    // Replicas, within what the shared quota is configured for; the Redis URL (and its
    // password) from a Secret.
    let replicas = seconds(at(deployment, "spec.replicas"));
    assert!(replicas >= 2, "replicas: {replicas}");
    let cluster = pod.raw.get("cluster").expect("a [cluster] section");
    let max = cluster
        .get("max_replicas")
        .and_then(toml::Value::as_integer)
        .expect("cluster.max_replicas");
    assert!(
        i64::try_from(replicas).expect("count") <= max,
        "replicas above cluster.max_replicas"
    );
    let redis_env = list(pod.container, "env")
        .iter()
        .find(|e| text(e, "name") == "MEETGATE__CLUSTER__REDIS_URL")
        .expect("MEETGATE__CLUSTER__REDIS_URL");
    assert!(
        !at(redis_env, "valueFrom.secretKeyRef").is_null(),
        "the Redis URL carries credentials: from a Secret"
    );

    // The Service: the proxy port only.
    let svc = m.only("Service");
    assert!(
        selects(at(svc, "spec.selector"), pod.labels),
        "Service selector"
    );
    let svc_ports: Vec<u16> = list(svc, "spec.ports")
        .iter()
        .map(|p| port_number(pod.container, at(p, "targetPort")))
        .collect();
    assert_eq!(
        svc_ports,
        [proxy],
        "the Service exposes the proxy port, not the admin port"
    );

    // The NetworkPolicy: the proxy port only from labelled clients; no rule open to all.
    let np = m.only("NetworkPolicy");
    assert!(
        selects(at(np, "spec.podSelector.matchLabels"), pod.labels),
        "NetworkPolicy selector"
    );
    assert!(strings(np, "spec.policyTypes").contains(&"Ingress".to_owned()));
    let rules = list(np, "spec.ingress");
    let client_label: Value = serde_yaml_ng::from_str("{meetgate-client: \"true\"}").expect("yaml");
    let mut reached = BTreeSet::new();
    for rule in rules {
        assert!(
            !list(rule, "from").is_empty(),
            "an ingress rule open to every source"
        );
        for p in list(rule, "ports") {
            let port = port_number(pod.container, at(p, "port"));
            reached.insert(port);
            if port == proxy {
                assert!(
                    list(rule, "from")
                        .iter()
                        .all(|f| selects(at(f, "podSelector.matchLabels"), &client_label)),
                    "the proxy port is reachable only from meetgate-client pods"
                );
            }
        }
    }
    assert_eq!(reached, BTreeSet::from([proxy, admin]), "ingress ports");

    // The PodDisruptionBudget keeps replicas serving through voluntary disruptions.
    let pdb = m.only("PodDisruptionBudget");
    assert!(
        selects(at(pdb, "spec.selector.matchLabels"), pod.labels),
        "PDB selector"
    );
    let max_unavailable = at(pdb, "spec.maxUnavailable").as_u64();
    let min_available = at(pdb, "spec.minAvailable").as_u64();
    assert!(
        matches!(max_unavailable, Some(n) if n >= 1 && n < replicas)
            || matches!(min_available, Some(n) if n >= 1 && n < replicas),
        "PDB: maxUnavailable or minAvailable between 1 and replicas - 1"
    );
}

#[test]
fn secrets_in_manifests_are_placeholders() {
    for file in [
        "deploy/kubernetes/sidecar.yaml",
        "deploy/kubernetes/gateway.yaml",
    ] {
        let m = Manifest::load(file);
        for secret in m.all("Secret") {
            assert!(
                at(secret, "data").is_null(),
                "{file}: use stringData placeholders"
            );
            let values = at(secret, "stringData").as_mapping().expect("stringData");
            for (k, v) in values {
                assert!(
                    v.as_str().is_some_and(|s| s.contains("REPLACE-ME")),
                    "{file}: {k:?} must be a REPLACE-ME placeholder"
                );
            }
        }
        for map in m.all("ConfigMap") {
            let body = serde_yaml_ng::to_string(at(map, "data")).expect("yaml");
            assert!(
                !body.contains("app_key ="),
                "{file}: an inline key in a ConfigMap"
            );
        }
    }
}

/// Dockerfile instructions, continuation lines joined, comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in read("deploy/container/Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && pending.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                pending.push_str(part);
                pending.push(' ');
            }
            None => {
                pending.push_str(t);
                let joined = std::mem::take(&mut pending);
                let (inst, rest) = joined.split_once(' ').unwrap_or((&joined, ""));
                out.push((inst.to_uppercase(), rest.trim().to_owned()));
            }
        }
    }
    out
}

fn words(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn dockerfile_matches_the_docs_and_its_config() {
    let all = dockerfile();
    let stages: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, (i, _))| i == "FROM")
        .map(|(n, _)| n)
        .collect();
    assert!(stages.len() >= 2, "a multi-stage build");
    let (build, runtime) = all.split_at(*stages.last().expect("a stage"));

    // The builder runs the production build command of docs/operations.md, exactly.
    let guide = read("docs/operations.md");
    // A command line of the Build section's code block, not a mention in prose.
    let documented = guide
        .lines()
        .skip_while(|l| l.trim() != "## Build")
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .find(|l| l.starts_with(PGO_BUILD))
        .map(|l| words(l.split('#').next().unwrap_or(l)))
        .expect(
            "docs/operations.md's Build section runs the production build (`deploy/build-pgo`)",
        );
    assert_eq!(documented, PGO_BUILD);
    let runs_it = build.iter().filter(|(i, _)| i == "RUN").any(|(_, args)| {
        let without_flags: Vec<&str> = args
            .split_whitespace()
            .skip_while(|w| w.starts_with("--"))
            .collect();
        without_flags
            .join(" ")
            .split("&&")
            .any(|cmd| words(cmd) == documented)
    });
    assert!(runs_it, "the builder runs `{documented}`");

    // The runtime stage: a slim base, the binary only, a numeric non-root user.
    assert!(
        !runtime[0].1.contains("rust"),
        "the runtime image is not the toolchain"
    );
    for (inst, args) in runtime {
        assert_ne!(inst, "ADD", "ADD in the runtime stage");
        if inst == "COPY" {
            assert!(
                args.starts_with("--from=") && args.ends_with("/usr/local/bin/meetgate"),
                "the runtime stage copies the binary only: COPY {args}"
            );
        }
        if inst == "ENV" {
            let upper = args.to_uppercase();
            assert!(
                !["KEY", "SECRET", "TOKEN", "PASSWORD", "MEETGATE"]
                    .iter()
                    .any(|w| upper.contains(w)),
                "no secrets or config baked in: ENV {args}"
            );
        }
    }
    let last = |inst: &str| {
        runtime
            .iter()
            .rev()
            .find(|(i, _)| i == inst)
            .map(|(_, a)| a.clone())
            .unwrap_or_else(|| panic!("no {inst} in the runtime stage"))
    };
    let user = last("USER");
    let uid: u32 = user
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("USER {user}: use a numeric UID"));
    assert_ne!(uid, 0, "USER must not be root");
    let json = |inst: &str| -> Vec<String> {
        serde_json::from_str(&last(inst)).unwrap_or_else(|e| panic!("{inst} in JSON form: {e}"))
    };
    assert_eq!(
        [json("ENTRYPOINT"), json("CMD")].concat(),
        ARGV,
        "the image runs `meetgate run --config {CONFIG_PATH}`"
    );

    // EXPOSE: the listeners of the config the image expects.
    let config = container_config();
    let exposed: BTreeSet<u16> = runtime
        .iter()
        .filter(|(i, _)| i == "EXPOSE")
        .flat_map(|(_, a)| a.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().expect("a port"))
        .collect();
    assert_eq!(
        exposed,
        BTreeSet::from([config.listen.port(), config.admin_listen.port()])
    );
    assert!(
        config.admin_listen.ip().is_unspecified(),
        "probes reach the admin port"
    );

    let ignore = read("deploy/container/Dockerfile.dockerignore");
    for entry in ["target/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == entry),
            "{entry} not in the build context"
        );
    }
}

/// A Dockerfile stage: its name, its `FROM` image, and the instructions after `FROM`.
struct Stage {
    name: String,
    from: String,
    body: Vec<(String, String)>,
}

fn stages(all: &[(String, String)]) -> Vec<Stage> {
    let mut out: Vec<Stage> = Vec::new();
    for (inst, args) in all {
        if inst == "FROM" {
            let w: Vec<&str> = args.split_whitespace().collect();
            let (from, name) = match w.as_slice() {
                [from, kw, name] if kw.eq_ignore_ascii_case("AS") => (*from, *name),
                [from] => (*from, ""),
                _ => panic!("FROM {args}"),
            };
            out.push(Stage {
                name: name.to_owned(),
                from: from.to_owned(),
                body: Vec::new(),
            });
        } else if let Some(stage) = out.last_mut() {
            stage.body.push((inst.clone(), args.clone()));
        }
    }
    out
}

/// The build argument that picks where the binary comes from, and the build context a
/// prebuilt binary comes in.
const BINARY_ARG: &str = "MEETGATE_BINARY";
const BINARY_CONTEXT: &str = "meetgate-bin";

#[test]
fn the_image_takes_the_builders_binary_by_default_or_a_prebuilt_one() {
    let all = dockerfile();
    // A global ARG (before the first FROM) names the stage; unset, it is the full build.
    let global: Vec<&(String, String)> = all.iter().take_while(|(i, _)| i != "FROM").collect();
    assert!(
        global.iter().any(|(i, a)| i == "ARG" && a == BINARY_ARG),
        "ARG {BINARY_ARG} before the first FROM"
    );
    let stages = stages(&all);
    let named = |name: &str| {
        stages
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no stage {name}"))
    };
    assert!(
        named("builder").from.starts_with("rust:"),
        "the builder is the Rust image"
    );
    // `prebuilt` holds the binary of the build context and nothing else, where the builder
    // leaves its own.
    let prebuilt = named("prebuilt");
    assert_eq!(
        prebuilt.from, "scratch",
        "the prebuilt stage is empty but for the binary"
    );
    assert_eq!(
        prebuilt.body,
        [(
            "COPY".to_owned(),
            format!("--from={BINARY_CONTEXT} --chmod=0755 meetgate /out/meetgate")
        )],
        "the prebuilt stage copies `meetgate` of the build context {BINARY_CONTEXT}"
    );
    let binary = named("binary");
    assert_eq!(
        binary.from,
        format!("${{{BINARY_ARG}:-builder}}"),
        "FROM ${{{BINARY_ARG}:-builder}} AS binary: the builder's unless told otherwise"
    );
    assert!(
        binary.body.is_empty(),
        "the binary stage only picks a stage"
    );
    let runtime = stages.last().expect("stages");
    assert_eq!(runtime.name, "runtime", "the runtime stage is the last");
    let copies: Vec<&String> = runtime
        .body
        .iter()
        .filter(|(i, _)| i == "COPY")
        .map(|(_, a)| a)
        .collect();
    assert_eq!(
        copies,
        ["--from=binary /out/meetgate /usr/local/bin/meetgate"],
        "the runtime copies the picked stage's binary"
    );

    // The image test and the documentation build the prebuilt way with the same argument
    // and context.
    for file in [TEST_IMAGE, "deploy/README.md"] {
        let text = read(file);
        for needle in [
            format!("--build-arg {BINARY_ARG}=prebuilt"),
            format!("--build-context {BINARY_CONTEXT}="),
        ] {
            assert!(text.contains(&needle), "{file} does not use {needle}");
        }
    }
}

/// Builds the image with podman and runs it as the manifests do (`.ci/run` runs it).
const TEST_IMAGE: &str = "deploy/test-image";

#[test]
fn the_image_test_script_parses_and_runs_the_image_as_the_sidecar_manifest_does() {
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(path(TEST_IMAGE))
        .output()
        .expect("run bash -n");
    assert!(
        syntax.status.success(),
        "{TEST_IMAGE} does not parse: {}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    let mode = std::fs::metadata(path(TEST_IMAGE))
        .expect("the script")
        .permissions();
    assert!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o111 != 0,
        "{TEST_IMAGE} is executable"
    );
    // The container runs with what the manifest's securityContext sets, and the user the
    // manifest runs as.
    let script = read(TEST_IMAGE);
    let m = Manifest::load("deploy/kubernetes/sidecar.yaml");
    let spec = at(m.only("Deployment"), "spec.template.spec");
    let container = list(spec, "initContainers")
        .iter()
        .find(|c| at(c, "name").as_str() == Some("meetgate"))
        .expect("the meetgate container");
    let sc = at(container, "securityContext");
    let user = format!(
        "--user {}:{}",
        at(sc, "runAsUser").as_u64().expect("runAsUser"),
        at(sc, "runAsGroup").as_u64().expect("runAsGroup")
    );
    for flag in [
        "--read-only",
        "--read-only-tmpfs=false",
        user.as_str(),
        "--cap-drop ALL",
        "--security-opt no-new-privileges",
        "-v \"$work/conf:/etc/meetgate:ro\"",
        "-v \"$work/secrets:/run/secrets/meetgate:ro\"",
    ] {
        assert!(
            script.contains(flag),
            "{TEST_IMAGE} runs the image without {flag}"
        );
    }
    assert!(
        script.contains("exit 0") && script.contains("skipped: podman is not installed"),
        "{TEST_IMAGE} skips without podman"
    );
}

/// The Kubernetes version whose schemas the manifests are validated against: the newest
/// kubernetes-validate knows (the manifests themselves need 1.29 and 1.30, see
/// deploy/README.md).
const KUBERNETES_VERSION: &str = "1.37";

/// `kubernetes-validate` (PyPI): `MEETGATE_KUBERNETES_VALIDATE`, `PATH`, or the virtualenv
/// `.ci/run` makes (`target/ci-k8s-venv`).
fn kubernetes_validate() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MEETGATE_KUBERNETES_VALIDATE") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "MEETGATE_KUBERNETES_VALIDATE={}: no such file",
            p.display()
        );
        return Some(p);
    }
    on_path("kubernetes-validate").or_else(|| {
        let venv = path("target/ci-k8s-venv/bin/kubernetes-validate");
        venv.is_file().then_some(venv)
    })
}

/// Runs `kubernetes-validate --strict` on `file`: its exit status and output.
fn validate_strictly(tool: &Path, file: &Path) -> (bool, String) {
    let out = Command::new(tool)
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(file)
        .output()
        .expect("kubernetes-validate runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn manifests_pass_kubernetes_schemas_in_strict_mode() {
    let Some(tool) = kubernetes_validate() else {
        eprintln!(
            "note: kubernetes-validate not found (pip install kubernetes-validate, or set \
             MEETGATE_KUBERNETES_VALIDATE); schema validation of the manifests skipped"
        );
        return;
    };
    let files = [
        "deploy/kubernetes/sidecar.yaml",
        "deploy/kubernetes/gateway.yaml",
    ];
    for file in files {
        let (ok, out) = validate_strictly(&tool, &path(file));
        assert!(ok, "{file} against Kubernetes {KUBERNETES_VERSION}:\n{out}");
        // Every document was checked against a schema, none skipped.
        let passed = out.matches(" passed for resource ").count();
        assert_eq!(
            passed,
            Manifest::load(file).docs.len(),
            "{file}: documents validated\n{out}"
        );
    }

    // Strictness: a field Kubernetes does not know (a misspelling in meetgate's hardening)
    // fails, naming it.
    let dir = tempfile::tempdir().expect("tempdir");
    let good = read("deploy/kubernetes/gateway.yaml");
    let (right, wrong) = (
        "readOnlyRootFilesystem: true",
        "readOnlyRootFileSystem: true",
    );
    assert_eq!(
        good.matches(right).count(),
        1,
        "one {right} in gateway.yaml"
    );
    let bad = dir.path().join("gateway.yaml");
    std::fs::write(&bad, good.replace(right, wrong)).expect("write");
    let (ok, out) = validate_strictly(&tool, &bad);
    assert!(!ok, "a misspelt field passed validation:\n{out}");
    assert!(
        out.contains("'readOnlyRootFileSystem' was unexpected"),
        "the failure names the misspelt field:\n{out}"
    );
}

/// The production build: a profile-guided release build (docs/operations.md, "Build").
const PGO_BUILD: &str = "deploy/build-pgo";

#[test]
fn the_production_build_script_builds_locked_and_trains_on_the_load_bench() {
    let script = read(PGO_BUILD);
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(path(PGO_BUILD))
        .output()
        .expect("run bash -n");
    assert!(
        syntax.status.success(),
        "{PGO_BUILD} does not parse: {}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    let lines: Vec<&str> = script.lines().map(str::trim).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("cargo bench --locked --bench load ")),
        "trains with the load bench"
    );
    // Both builds (instrumented and optimised) use the committed lock file.
    let builds: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("cargo build"))
        .collect();
    assert_eq!(builds.len(), 2, "an instrumented and an optimised build");
    for b in builds {
        assert!(
            b.starts_with("cargo build --release --locked "),
            "not a locked release build: {b}"
        );
    }
    // Every setting the script gives the bench is one the bench reads.
    let bench = read("benches/load.rs");
    let settings: BTreeSet<&str> = script
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("LOAD_"))
        .collect();
    assert!(
        settings.contains("LOAD_MEETGATE"),
        "trains the built binary"
    );
    for s in settings {
        assert!(
            bench.contains(&format!("\"{s}\"")),
            "{PGO_BUILD} sets {s}, which benches/load.rs never reads"
        );
    }
    // The image ships what the script builds, and runs the script as a program.
    assert!(
        lines.contains(&"out=target/pgo")
            && script.contains(
                r#"install -m 0755 "$out/optimized/$host/release/meetgate" "$out/meetgate""#
            ),
        "the script leaves its binary at target/pgo/meetgate"
    );
    let dockerfile = read("deploy/container/Dockerfile");
    assert!(
        dockerfile.contains("install -D -m 0755 target/pgo/meetgate /out/meetgate"),
        "the builder installs the profile-guided binary"
    );
    let mode = std::fs::metadata(path(PGO_BUILD))
        .expect("the script")
        .permissions();
    assert!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o111 != 0,
        "{PGO_BUILD} is executable"
    );
}

/// `(section, key, value)` of a systemd unit, in order, repeated keys kept.
fn unit(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_owned();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a directive: {line}"));
        assert!(!line.ends_with('\\'), "no continuation lines: {line}");
        out.push((section.clone(), k.trim().to_owned(), v.trim().to_owned()));
    }
    out
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[test]
fn systemd_unit_is_hardened_and_matches_its_config() {
    let unit_text = read("deploy/systemd/meetgate.service");
    let entries = unit(&unit_text);
    let values = |key: &str| -> Vec<&str> {
        entries
            .iter()
            .filter(|(s, k, _)| s == "Service" && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    };
    let one = |key: &str| -> &str {
        match values(key).as_slice() {
            [v] => v,
            other => panic!("[Service] {key}: one value expected, found {other:?}"),
        }
    };

    assert!(matches!(one("Type"), "exec" | "simple"), "Type");
    let exec: Vec<&str> = one("ExecStart").split_whitespace().collect();
    assert_eq!(exec, ARGV, "ExecStart");
    let reload = one("ExecReload");
    assert!(
        reload.contains("-HUP") && reload.contains("$MAINPID"),
        "ExecReload: {reload}"
    );
    for (key, want) in [
        ("Restart", "on-failure"),
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(one(key), want, "[Service] {key}");
    }
    assert!(!one("RestartSec").is_empty(), "RestartSec");
    let families: BTreeSet<&str> = one("RestrictAddressFamilies").split_whitespace().collect();
    assert_eq!(families, BTreeSet::from(["AF_INET", "AF_INET6", "AF_UNIX"]));
    assert_eq!(
        values("SystemCallFilter").first().copied(),
        Some("@system-service"),
        "SystemCallFilter"
    );

    // The credential the unit loads is the key file the config reads.
    let (cred_name, cred_source) = one("LoadCredential").split_once(':').expect("NAME:PATH");
    assert!(
        cred_source.starts_with("/etc/meetgate/"),
        "LoadCredential source"
    );
    let cred_path = format!("/run/credentials/meetgate.service/{cred_name}");
    let config_text = read("deploy/systemd/meetgate.toml");
    let raw: toml::Table = config_text.parse().expect("TOML");
    let (files, vars) = secret_inputs(&raw);
    assert!(
        vars.is_empty(),
        "keys come from credentials, not the environment"
    );
    assert_eq!(
        files.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>(),
        [cred_path.as_str()],
        "app_key_file is the credential's path"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, _) = load_with_dummies(&config_text, HashMap::new(), dir.path());
    let stop = humantime::parse_duration(one("TimeoutStopSec")).expect("TimeoutStopSec");
    assert!(
        stop > config.shutdown_grace,
        "TimeoutStopSec must exceed shutdown_grace"
    );

    // systemd's own checks, against the built binary (the unit's path is not installed here).
    let Some(analyze) = on_path("systemd-analyze") else {
        eprintln!("note: systemd-analyze not on PATH; `systemd-analyze verify` skipped");
        return;
    };
    let copy = dir.path().join("meetgate.service");
    let patched = unit_text.replace(
        "ExecStart=/usr/local/bin/meetgate ",
        &format!("ExecStart={BIN} "),
    );
    assert_ne!(patched, unit_text, "ExecStart rewritten");
    std::fs::write(&copy, patched).expect("write unit");
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );

    // The exposure score (0 best, 10 worst; --threshold is in tenths), offline: systemd 250+.
    let out = Command::new(&analyze)
        .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("unrecognized option") || stderr.contains("Unknown option") {
        eprintln!("note: this systemd-analyze has no offline security check: {stderr}");
        return;
    }
    assert!(
        out.status.success(),
        "systemd-analyze security: exposure above 2.0\n{stdout}\n{stderr}"
    );
}
