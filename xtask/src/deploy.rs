//! Checks of the deployment files under `deploy/` that need no build, run by `cargo xtask test`:
//! the Prometheus rules with promtool, the Kubernetes manifests against the API's schemas.

use std::process::Command;

use anyhow::bail;

use crate::{
    setup,
    util::{is_root, run, step, workspace_root},
};

const RULES: &str = "deploy/prometheus/guardian-rules.yml";
const RULES_TEST: &str = "deploy/prometheus/guardian-rules.test.yml";
/// In the order `kubectl apply -f deploy/kubernetes/` applies them (by name).
const MANIFESTS: [&str; 4] = [
    "deploy/kubernetes/00-namespace.yaml",
    "deploy/kubernetes/10-serviceaccount.yaml",
    "deploy/kubernetes/20-configmap.yaml",
    "deploy/kubernetes/30-daemonset.yaml",
];
/// The oldest and the newest Kubernetes schemas the pinned kubernetes-validate ships.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.25.0", "1.37.0"];

pub fn check() -> anyhow::Result<()> {
    let root = workspace_root();
    step("deployment files: Prometheus rules");
    match setup::promtool()? {
        Some(promtool) => {
            run(Command::new(&promtool)
                .args(["check", "rules"])
                .arg(root.join(RULES)))?;
            run(Command::new(&promtool)
                .args(["test", "rules"])
                .arg(root.join(RULES_TEST)))?;
        }
        None => skipped("promtool", RULES)?,
    }

    step("deployment files: Kubernetes manifests");
    match setup::kubernetes_validate()? {
        Some(validate) => {
            for version in KUBERNETES_VERSIONS {
                // --strict: an unknown field (a typo) is an error, not a warning.
                run(Command::new(&validate)
                    .args(["--strict", "--kubernetes-version", version])
                    .args(MANIFESTS.iter().map(|m| root.join(m))))?;
            }
        }
        None => skipped("kubernetes-validate", "deploy/kubernetes")?,
    }
    Ok(())
}

/// A tool that could not be installed: root could have, so that fails; others skip, loudly.
fn skipped(tool: &str, what: &str) -> anyhow::Result<()> {
    if is_root() {
        bail!("{tool} could not be installed: {what} is unchecked");
    }
    eprintln!("SKIPPED: {what} is unchecked: {tool} is missing and only root can install it here");
    Ok(())
}

/// The policy the ConfigMap holds: its `policy.toml: |` block, unindented.
#[cfg(test)]
fn configmap_policy(yaml: &str) -> Option<String> {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "policy.toml: |");
    lines.next()?;
    let mut text = String::new();
    for line in lines.take_while(|l| l.is_empty() || l.starts_with("    ")) {
        text.push_str(line.get(4..).unwrap_or_default());
        text.push('\n');
    }
    Some(text)
}

#[cfg(test)]
fn read(rel: &str) -> String {
    std::fs::read_to_string(workspace_root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configmap_holds_the_packaged_example() {
        let policy = configmap_policy(&read("deploy/kubernetes/20-configmap.yaml"))
            .expect("20-configmap.yaml has a `policy.toml: |` block");
        let example = crate::dist::audit_example().unwrap();
        let header = policy.strip_suffix(example.as_str()).unwrap_or_else(|| {
            panic!(
                "the ConfigMap's policy is not {} in audit mode (regenerate it from \
                 dist::audit_example):\n{policy}",
                "policies/analyticbot.toml"
            )
        });
        assert!(
            header.lines().all(|l| l.is_empty() || l.starts_with('#')),
            "the ConfigMap's own header must be comments only:\n{header}"
        );
    }

    #[test]
    fn the_daemonset_runs_the_configmap_directory_and_this_version() {
        let ds = read("deploy/kubernetes/30-daemonset.yaml");
        // subPath mounts never see a ConfigMap's updates.
        assert!(
            !ds.lines().any(|l| l.trim_start().starts_with("subPath:")),
            "{ds}"
        );
        assert!(ds.contains("mountPath: /etc/guardian\n"), "{ds}");
        assert!(ds.contains("- /etc/guardian/policy.toml\n"), "{ds}");
        let image = format!("image: localhost/guardian:{}\n", env!("CARGO_PKG_VERSION"));
        assert!(
            ds.contains(&image),
            "the DaemonSet must run this version: {image}"
        );
        assert!(workspace_root()
            .join("deploy/kubernetes/Containerfile")
            .is_file());
    }
}
