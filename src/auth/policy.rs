//! Authorization through casbin: RBAC where the domain is the carrier scope
//! of the request. A rule's domain is `*` (any carrier) or `own` (only the
//! caller's own carrier). Deny by default.

use std::path::Path;
use std::sync::RwLock;

use anyhow::Context;
use casbin::{CoreApi, DefaultModel, Enforcer, MemoryAdapter, MgmtApi};

use super::Role;

pub const DEFAULT_MODEL: &str = include_str!("../../policies/model.conf");
pub const DEFAULT_POLICY: &str = include_str!("../../policies/policy.csv");

/// Which carriers a request touches, relative to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Only the caller's own carrier.
    Own,
    /// Another carrier, or all carriers.
    Any,
}

pub struct Policy {
    enforcer: RwLock<Enforcer>,
}

impl Policy {
    /// Loads `model.conf` and `policy.csv` from `dir`, or the compiled-in
    /// defaults.
    pub async fn load(dir: Option<&Path>) -> anyhow::Result<Self> {
        let (model, policy) = match dir {
            Some(d) => (
                std::fs::read_to_string(d.join("model.conf"))
                    .with_context(|| format!("cannot read {}", d.join("model.conf").display()))?,
                std::fs::read_to_string(d.join("policy.csv"))
                    .with_context(|| format!("cannot read {}", d.join("policy.csv").display()))?,
            ),
            None => (DEFAULT_MODEL.to_string(), DEFAULT_POLICY.to_string()),
        };
        Self::from_text(&model, &policy).await
    }

    /// Builds the enforcer from the text of a model and a rule file; errors
    /// name the file and line.
    pub async fn from_text(model: &str, policy: &str) -> anyhow::Result<Self> {
        Ok(Self {
            enforcer: RwLock::new(build(model, policy).await?),
        })
    }

    /// Whether `role` may perform `act` on `obj` with the given reach.
    pub fn allows(&self, role: Role, reach: Reach, obj: &str, act: &str) -> bool {
        let dom = match reach {
            Reach::Own => "own",
            Reach::Any => "*",
        };
        let e = self.enforcer.read().expect("policy lock");
        match e.enforce((role.as_str(), dom, obj, act)) {
            Ok(allowed) => allowed,
            Err(err) => {
                tracing::error!(error = %err, "policy evaluation failed; denying");
                false
            }
        }
    }
}

async fn build(model: &str, policy: &str) -> anyhow::Result<Enforcer> {
    let m = DefaultModel::from_str(model)
        .await
        .context("model.conf does not parse as a casbin model")?;
    let mut e = Enforcer::new(m, MemoryAdapter::default())
        .await
        .context("casbin enforcer")?;
    let (mut p, mut g) = (Vec::new(), Vec::new());
    for (n, line) in policy.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = n + 1;
        let fields: Vec<String> = line.split(',').map(|f| f.trim().to_string()).collect();
        match fields.first().map(String::as_str) {
            Some("p") if fields.len() == 5 => {
                let (role, dom, obj, act) = (&fields[1], &fields[2], &fields[3], &fields[4]);
                anyhow::ensure!(
                    role.parse::<Role>().is_ok(),
                    "policy.csv line {at}: unknown role {role:?}; expected one of: {}",
                    Role::expected()
                );
                anyhow::ensure!(
                    dom == "own" || dom == "*",
                    "policy.csv line {at}: domain must be `own` or `*`, not {dom:?}"
                );
                anyhow::ensure!(
                    !obj.is_empty(),
                    "policy.csv line {at}: the object is empty"
                );
                // A rule of an older policy would now grant nothing, silently.
                anyhow::ensure!(
                    !(obj == "consents" && act == "write"),
                    "policy.csv line {at}: consents are written per kind; write \
                     `consents/customer_operator` and/or `consents/data_subject` \
                     instead of `consents`"
                );
                anyhow::ensure!(
                    ["read", "write", "decrypt"].contains(&act.as_str()),
                    "policy.csv line {at}: action must be read, write or decrypt, not {act:?}"
                );
                p.push(fields[1..].to_vec())
            }
            Some("g") if fields.len() == 3 => g.push(fields[1..].to_vec()),
            _ => anyhow::bail!(
                "policy.csv line {at}: expected `p, role, domain, object, action` or `g, role, role`"
            ),
        }
    }
    if !p.is_empty() {
        e.add_policies(p).await?;
    }
    if !g.is_empty() {
        e.add_grouping_policies(g).await?;
    }
    // A model that parses but cannot evaluate a request would deny
    // everything at run time: refuse it now.
    e.enforce(("admin", "*", "keys", "read"))
        .context("model.conf cannot evaluate a request (role, domain, object, action)")?;
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn default_policy_denies_by_default_and_scopes_carriers() {
        let p = Policy::load(None).await.unwrap();
        assert!(p.allows(Role::Carrier, Reach::Own, "transfers", "read"));
        assert!(!p.allows(Role::Carrier, Reach::Any, "transfers", "read"));
        assert!(p.allows(Role::PrivacyOfficer, Reach::Any, "transfers", "read"));
        assert!(p.allows(Role::PrivacyOfficer, Reach::Own, "transfers", "read"));
        assert!(!p.allows(
            Role::Carrier,
            Reach::Own,
            "transfers/platform_to_carrier",
            "write"
        ));
        assert!(p.allows(
            Role::Platform,
            Reach::Any,
            "transfers/platform_to_carrier",
            "write"
        ));
        assert!(!p.allows(Role::Auditor, Reach::Any, "transfers", "decrypt"));
        assert!(!p.allows(Role::Admin, Reach::Any, "no-such-object", "read"));
        assert!(p.allows(Role::Carrier, Reach::Own, "consents/data_subject", "write"));
        assert!(!p.allows(
            Role::Carrier,
            Reach::Own,
            "consents/customer_operator",
            "write"
        ));
    }

    #[tokio::test]
    async fn a_consents_write_rule_of_an_older_policy_is_refused_by_line() {
        let err = build(
            DEFAULT_MODEL,
            "# old\np, carrier, own, consents, read\np, carrier, own, consents, write\n",
        )
        .await
        .err()
        .expect("an old consents rule is refused");
        assert!(
            err.to_string()
                .starts_with("policy.csv line 3: consents are written per kind"),
            "{err}"
        );
    }
}
