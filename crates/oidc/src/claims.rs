//! The CIS2 user as clients see it: who, their national RBAC roles with organisations, the selected
//! role, and how strongly they authenticated — built from the ID token and userinfo claims
//! (cis2-reference.md §5). A user with no roles is a valid user.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    /// `person_roleid`.
    pub id: String,
    /// `role_code`, e.g. `S8000:G8000:R8001`.
    pub code: String,
    /// The readable job role: the last part of `role_name` without its quotes.
    pub name: String,
    pub org_code: String,
    /// From `nhsid_user_orgs`; `null` when CIS2 did not name the organisation.
    pub org_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assurance {
    pub acr: Option<String>,
    pub amr: Vec<String>,
    pub id_assurance_level: Option<String>,
    pub authentication_assurance_level: Option<String>,
    pub auth_time: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub uid: String,
    pub name: Option<String>,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    pub email: Option<String>,
    pub roles: Vec<Role>,
    pub selected_role: Option<Role>,
    pub assurance: Assurance,
}

fn text(map: &Map<String, Value>, name: &str) -> Option<String> {
    match map.get(name)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `"Clinical":"Clinical Provision":"Nurse Access Role"` → `Nurse Access Role`.
pub fn readable_role_name(role_name: &str) -> String {
    role_name
        .rsplit("\":\"")
        .next()
        .unwrap_or(role_name)
        .trim_matches('"')
        .to_string()
}

impl User {
    /// Builds the user from verified ID token claims and userinfo claims (whose `sub` already matched).
    pub fn from_claims(id_token: &Map<String, Value>, userinfo: &Map<String, Value>) -> User {
        let either = |name: &str| text(userinfo, name).or_else(|| text(id_token, name));
        let orgs: Vec<(String, String)> = userinfo
            .get("nhsid_user_orgs")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(|o| {
                        Some((
                            text(o.as_object()?, "org_code")?,
                            text(o.as_object()?, "org_name")?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let roles: Vec<Role> = userinfo
            .get("nhsid_nrbac_roles")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(Value::as_object)
                    .filter_map(|r| {
                        let org_code = text(r, "org_code").unwrap_or_default();
                        Some(Role {
                            id: text(r, "person_roleid")?,
                            code: text(r, "role_code").unwrap_or_default(),
                            name: text(r, "role_name")
                                .map(|n| readable_role_name(&n))
                                .unwrap_or_default(),
                            org_name: orgs
                                .iter()
                                .find(|(code, _)| *code == org_code)
                                .map(|(_, name)| name.clone()),
                            org_code,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let selected_role =
            either("selected_roleid").and_then(|id| roles.iter().find(|r| r.id == id).cloned());
        let amr = match id_token.get("amr") {
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            Some(Value::String(one)) => vec![one.clone()],
            _ => Vec::new(),
        };
        let given_name = either("given_name");
        let family_name = either("family_name");
        let name = either("name")
            .or_else(|| either("display_name"))
            .or_else(|| match (&given_name, &family_name) {
                (Some(g), Some(f)) => Some(format!("{g} {f}")),
                _ => None,
            });
        User {
            uid: either("uid")
                .or_else(|| either("nhsid_useruid"))
                .or_else(|| text(id_token, "sub"))
                .unwrap_or_default(),
            name,
            given_name,
            family_name,
            email: either("email"),
            roles,
            selected_role,
            assurance: Assurance {
                acr: text(id_token, "acr"),
                amr,
                id_assurance_level: text(id_token, "id_assurance_level")
                    .or_else(|| text(userinfo, "idassurancelevel")),
                authentication_assurance_level: text(id_token, "authentication_assurance_level"),
                auth_time: id_token.get("auth_time").and_then(Value::as_u64),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn the_selected_role_and_its_organisation_are_resolved() {
        let id = obj(
            json!({"sub": "555021935107", "selected_roleid": "5555666677778888", "acr": "AAL3_ANY",
            "amr": ["N3_SMARTCARD"], "id_assurance_level": "3", "authentication_assurance_level": "3", "auth_time": 1700000000}),
        );
        let info = obj(json!({
            "sub": "555021935107", "uid": "555021935107", "name": "Ben Okafor", "given_name": "Ben", "family_name": "Okafor",
            "nhsid_nrbac_roles": [
                {"person_roleid": "5555666677778888", "org_code": "A9A5A", "role_code": "S8000:G8000:R8001",
                 "role_name": "\"Clinical\":\"Clinical Provision\":\"Nurse Access Role\""},
                {"person_roleid": "1", "org_code": "ZZZ", "role_code": "S1:G1:R1", "role_name": "\"X\""}
            ],
            "nhsid_user_orgs": [{"org_code": "A9A5A", "org_name": "Ashby Medical Practice"}]
        }));
        let user = User::from_claims(&id, &info);
        let selected = user.selected_role.clone().unwrap();
        assert_eq!(selected.name, "Nurse Access Role");
        assert_eq!(selected.org_name.as_deref(), Some("Ashby Medical Practice"));
        assert_eq!(user.roles[1].org_name, None);
        assert_eq!(user.assurance.amr, vec!["N3_SMARTCARD"]);
        assert_eq!(user.assurance.auth_time, Some(1700000000));
        let wire = serde_json::to_value(&user).unwrap();
        assert_eq!(wire["selected_role"]["id"], "5555666677778888");
        assert_eq!(wire["assurance"]["acr"], "AAL3_ANY");
    }

    #[test]
    fn no_roles_is_a_valid_user_and_both_level_spellings_are_read() {
        let user = User::from_claims(
            &obj(json!({"sub": "9", "amr": "TOTP"})),
            &obj(json!({"sub": "9", "idassurancelevel": "2"})),
        );
        assert!(user.roles.is_empty() && user.selected_role.is_none());
        assert_eq!(user.uid, "9");
        assert_eq!(user.assurance.id_assurance_level.as_deref(), Some("2"));
        assert_eq!(user.assurance.amr, vec!["TOTP"]);
    }
}
