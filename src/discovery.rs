//! `-sidecar-for`: find the one connect-proxy registration whose destination is a service.

use std::collections::HashMap;

use crate::consul::api::AgentService;

/// Why `-sidecar-for` could not pick a registration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SidecarError {
    /// No registration fronts the service.
    #[error(
        "no sidecar proxy is registered for service ID {service:?} on this agent{}",
        if *hidden_by_acls {
            " that this token may read (the agent hid some services from it: the token likely lacks service:read on the sidecar)"
        } else {
            ""
        }
    )]
    None {
        /// The service ID asked for.
        service: String,
        /// The agent said ACLs filtered the list (`X-Consul-Results-Filtered-By-Acls`).
        hidden_by_acls: bool,
    },
    /// Several do; the user must pick one.
    #[error(
        "more than one sidecar proxy is registered for service ID {service:?}; start with -proxy-id and one of: {}",
        ids.join(", ")
    )]
    Several {
        /// The service ID asked for.
        service: String,
        /// The candidate proxy IDs, sorted.
        ids: Vec<String>,
    },
}

/// Picks the proxy ID among the agent's services: `Kind == connect-proxy` and
/// `Proxy.DestinationServiceID` equal to `service_id` (case-insensitively, as Consul does).
/// `hidden_by_acls`: the agent filtered the list for this token, which a "none" error says.
pub fn select_sidecar(
    services: &HashMap<String, AgentService>,
    hidden_by_acls: bool,
    service_id: &str,
) -> Result<String, SidecarError> {
    let mut ids: Vec<String> = services
        .values()
        .filter(|s| s.kind == "connect-proxy")
        .filter(|s| {
            s.proxy
                .as_ref()
                .is_some_and(|p| p.destination_service_id.eq_ignore_ascii_case(service_id))
        })
        .map(|s| s.id.clone())
        .collect();
    ids.sort();
    match ids.len() {
        0 => Err(SidecarError::None {
            service: service_id.to_owned(),
            hidden_by_acls,
        }),
        1 => Ok(ids.remove(0)),
        _ => Err(SidecarError::Several {
            service: service_id.to_owned(),
            ids,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services(list: &[(&str, &str, &str)]) -> HashMap<String, AgentService> {
        list.iter()
            .map(|(id, kind, dest)| {
                let svc: AgentService = serde_json::from_value(serde_json::json!({
                    "ID": id, "Service": id, "Kind": kind,
                    "Proxy": {"DestinationServiceID": dest, "DestinationServiceName": dest}
                }))
                .unwrap();
                (id.to_string(), svc)
            })
            .collect()
    }

    #[test]
    fn picks_the_single_sidecar_case_insensitively() {
        let s = services(&[
            ("web", "", ""),
            ("web-sidecar-proxy", "connect-proxy", "WEB"),
            ("db-sidecar-proxy", "connect-proxy", "db"),
        ]);
        assert_eq!(
            select_sidecar(&s, false, "web").unwrap(),
            "web-sidecar-proxy"
        );
    }

    #[test]
    fn none_and_several_are_errors_naming_the_candidates() {
        let s = services(&[("web", "", "")]);
        assert_eq!(
            select_sidecar(&s, false, "web"),
            Err(SidecarError::None {
                service: "web".into(),
                hidden_by_acls: false
            })
        );
        let err = select_sidecar(&s, true, "web").unwrap_err().to_string();
        assert!(err.contains("likely lacks service:read"), "{err}");
        let s = services(&[
            ("p2", "connect-proxy", "web"),
            ("p1", "connect-proxy", "web"),
        ]);
        let err = select_sidecar(&s, true, "web").unwrap_err();
        assert!(err.to_string().contains("one of: p1, p2"), "{err}");
    }

    #[test]
    fn ignores_non_proxies_even_with_a_matching_destination() {
        let s = services(&[("gw", "mesh-gateway", "web")]);
        assert!(select_sidecar(&s, false, "web").is_err());
    }
}
