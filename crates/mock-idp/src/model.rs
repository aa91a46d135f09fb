//! Users and clients: what they look like in their TOML files and in memory.

use cis2_jose::{Alg, JwkSet};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A way of signing in, with the assurance it gives and the `amr` it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Authenticator {
    Smartcard,
    WindowsHello,
    SecurityKey,
    Passkey,
    AuthenticatorApp,
    Nhsmail,
}

impl Authenticator {
    pub const ALL: [Authenticator; 6] = [
        Authenticator::Smartcard,
        Authenticator::WindowsHello,
        Authenticator::SecurityKey,
        Authenticator::Passkey,
        Authenticator::AuthenticatorApp,
        Authenticator::Nhsmail,
    ];

    /// Authentication assurance level: 3 ("very high") or 2 ("high").
    pub fn level(self) -> u8 {
        match self {
            Authenticator::Smartcard
            | Authenticator::WindowsHello
            | Authenticator::SecurityKey
            | Authenticator::Passkey => 3,
            Authenticator::AuthenticatorApp | Authenticator::Nhsmail => 2,
        }
    }

    pub fn amr(self) -> &'static str {
        match self {
            Authenticator::Smartcard => "N3_SMARTCARD",
            Authenticator::WindowsHello => "WHFB",
            Authenticator::SecurityKey => "FIDO2",
            Authenticator::Passkey => "PASSKEY",
            Authenticator::AuthenticatorApp => "TOTP",
            Authenticator::Nhsmail => "NHSMAIL",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Authenticator::Smartcard => "Smartcard",
            Authenticator::WindowsHello => "Windows Hello for Business",
            Authenticator::SecurityKey => "Security key",
            Authenticator::Passkey => "Passkey",
            Authenticator::AuthenticatorApp => "Authenticator app",
            Authenticator::Nhsmail => "NHSmail",
        }
    }

    pub fn form_value(self) -> &'static str {
        match self {
            Authenticator::Smartcard => "smartcard",
            Authenticator::WindowsHello => "windows_hello",
            Authenticator::SecurityKey => "security_key",
            Authenticator::Passkey => "passkey",
            Authenticator::AuthenticatorApp => "authenticator_app",
            Authenticator::Nhsmail => "nhsmail",
        }
    }

    pub fn from_form_value(value: &str) -> Option<Authenticator> {
        Authenticator::ALL
            .into_iter()
            .find(|a| a.form_value() == value)
    }
}

/// The `acr_values` CIS2 knows. Each one decides which authenticators satisfy it.
pub const KNOWN_ACR_VALUES: [&str; 10] = [
    "AAL3_ANY",
    "AAL2_OR_AAL3_ANY",
    "AAL2_ANY",
    "AAL3_N3_SMARTCARD",
    "AAL3_CIS2_SMARTCARD",
    "AAL3_FIDO2",
    "AAL3_IOS",
    "AAL2_TOTP",
    "AAL2_NHSMAIL",
    "AAL1_USERPASS",
];

/// Whether signing in with `authenticator` meets `acr`.
pub fn acr_satisfied_by(acr: &str, authenticator: Authenticator) -> bool {
    use Authenticator::*;
    match acr {
        "AAL3_ANY" => authenticator.level() >= 3,
        "AAL2_OR_AAL3_ANY" | "AAL2_ANY" | "AAL1_USERPASS" => authenticator.level() >= 2,
        "AAL3_N3_SMARTCARD" | "AAL3_CIS2_SMARTCARD" => authenticator == Smartcard,
        "AAL3_FIDO2" => matches!(authenticator, WindowsHello | SecurityKey | Passkey),
        "AAL2_TOTP" => authenticator == AuthenticatorApp,
        "AAL2_NHSMAIL" => authenticator == Nhsmail,
        _ => false,
    }
}

/// The `acr` a token reports: the first requested value the authenticator met, as ForgeRock does; with
/// nothing requested, the level reached.
pub fn acr_for(requested: &[String], authenticator: Authenticator) -> Option<String> {
    if requested.is_empty() {
        return Some(
            if authenticator.level() >= 3 {
                "AAL3_ANY"
            } else {
                "AAL2_ANY"
            }
            .to_string(),
        );
    }
    requested
        .iter()
        .find(|acr| acr_satisfied_by(acr, authenticator))
        .cloned()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Org {
    pub org_code: String,
    pub org_name: String,
}

/// One entry of `nhsid_nrbac_roles`, spelled as CIS2 spells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub person_roleid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub person_orgid: Option<String>,
    pub org_code: String,
    pub role_code: String,
    pub role_name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub activities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub activity_codes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aow: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aow_codes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workgroups: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workgroups_codes: Vec<String>,
}

impl Role {
    /// The readable last part of `role_name`: `"A":"B":"Nurse Access Role"` → `Nurse Access Role`.
    pub fn short_name(&self) -> String {
        self.role_name
            .rsplit("\":\"")
            .next()
            .unwrap_or(&self.role_name)
            .trim_matches('"')
            .to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub uid: String,
    pub given_name: String,
    pub family_name: String,
    #[serde(default)]
    pub middle_names: Option<String>,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default = "default_assurance")]
    pub id_assurance_level: String,
    pub authenticators: Vec<Authenticator>,
    #[serde(default)]
    pub orgs: Vec<Org>,
    #[serde(default)]
    pub roles: Vec<Role>,
}

fn default_assurance() -> String {
    "3".into()
}

impl User {
    pub fn name(&self) -> String {
        format!("{} {}", self.given_name, self.family_name)
    }

    pub fn display_name(&self) -> String {
        match &self.title {
            Some(title) => format!("{title} {} {}", self.given_name, self.family_name),
            None => self.name(),
        }
    }

    pub fn initials(&self) -> String {
        let mut initials: String = self.given_name.chars().take(1).collect();
        if let Some(middle) = &self.middle_names {
            initials.extend(middle.split_whitespace().filter_map(|m| m.chars().next()));
        }
        initials
    }

    pub fn role(&self, person_roleid: &str) -> Option<&Role> {
        self.roles.iter().find(|r| r.person_roleid == person_roleid)
    }

    pub fn org_name(&self, org_code: &str) -> Option<&str> {
        self.orgs
            .iter()
            .find(|o| o.org_code == org_code)
            .map(|o| o.org_name.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMethod {
    PrivateKeyJwt,
    ClientSecretPost,
    None,
}

impl ClientAuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuthMethod::PrivateKeyJwt => "private_key_jwt",
            ClientAuthMethod::ClientSecretPost => "client_secret_post",
            ClientAuthMethod::None => "none",
        }
    }
}

/// A registered relying party.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Client {
    pub client_id: String,
    #[serde(default)]
    pub name: Option<String>,
    pub auth_method: ClientAuthMethod,
    /// `client_secret_post`: the secret.
    #[serde(default)]
    pub client_secret: Option<String>,
    /// `private_key_jwt`: the public keys, inline (a JWKS as a JSON string or table).
    #[serde(default)]
    pub jwks: Option<JwksValue>,
    /// `private_key_jwt`: where to fetch the public keys.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Exact URIs; loopback ones (`http://127.0.0.1/…`, `http://[::1]/…`) match any port.
    pub redirect_uris: Vec<String>,
    #[serde(default)]
    pub post_logout_redirect_uris: Vec<String>,
    #[serde(default)]
    pub backchannel_logout_uri: Option<String>,
    /// The algorithm of this client's ID tokens.
    #[serde(default = "default_alg")]
    pub id_token_signed_response_alg: Alg,
    #[serde(default)]
    pub refresh_tokens: bool,
    #[serde(default)]
    pub rotate_refresh_tokens: bool,
}

fn default_alg() -> Alg {
    Alg::RS256
}

/// A JWKS given inline, either as a JSON string or as a TOML/JSON table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum JwksValue {
    Json(String),
    Table(JwkSet),
}

impl JwksValue {
    pub fn parse(&self) -> Result<JwkSet, String> {
        match self {
            JwksValue::Table(set) => Ok(set.clone()),
            JwksValue::Json(text) => {
                serde_json::from_str(text).map_err(|e| format!("inline jwks is not a JWKS: {e}"))
            }
        }
    }
}

impl Client {
    /// Whether `uri` is one of this client's redirect URIs (RFC 8252 §7.3: any port on loopback).
    pub fn accepts_redirect_uri(&self, uri: &str) -> bool {
        self.redirect_uris
            .iter()
            .any(|registered| redirect_uri_matches(registered, uri))
    }

    pub fn check(&self) -> Result<(), String> {
        let id = &self.client_id;
        match self.auth_method {
            ClientAuthMethod::PrivateKeyJwt if self.jwks.is_none() && self.jwks_uri.is_none() => {
                Err(format!(
                    "client {id}: private_key_jwt needs `jwks` or `jwks_uri`"
                ))
            }
            ClientAuthMethod::ClientSecretPost if self.client_secret.is_none() => Err(format!(
                "client {id}: client_secret_post needs `client_secret`"
            )),
            _ if self.redirect_uris.is_empty() => {
                Err(format!("client {id}: `redirect_uris` is empty"))
            }
            _ => {
                if let Some(jwks) = &self.jwks {
                    jwks.parse().map_err(|e| format!("client {id}: {e}"))?;
                }
                Ok(())
            }
        }
    }
}

/// Exact match, except that a loopback IP literal with http matches on any port.
pub fn redirect_uri_matches(registered: &str, presented: &str) -> bool {
    if registered == presented {
        return true;
    }
    let (Ok(reg), Ok(pres)) = (url::Url::parse(registered), url::Url::parse(presented)) else {
        return false;
    };
    let loopback = |u: &url::Url| {
        u.scheme() == "http"
            && match u.host() {
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                _ => false,
            }
    };
    loopback(&reg)
        && loopback(&pres)
        && reg.scheme() == pres.scheme()
        && reg.host() == pres.host()
        && reg.path() == pres.path()
        && reg.query() == pres.query()
        && pres.fragment().is_none()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    users: Vec<User>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientsFile {
    clients: Vec<Client>,
}

pub const DEFAULT_USERS: &str = include_str!("../data/users.toml");
pub const DEFAULT_CLIENTS: &str = include_str!("../data/clients.toml");

pub fn parse_users(text: &str, origin: &str) -> Result<Vec<User>, String> {
    let file: UsersFile = toml::from_str(text).map_err(|e| format!("{origin}: {e}"))?;
    Ok(file.users)
}

pub fn parse_clients(text: &str, origin: &str) -> Result<Vec<Client>, String> {
    let file: ClientsFile = toml::from_str(text).map_err(|e| format!("{origin}: {e}"))?;
    for client in &file.clients {
        client.check().map_err(|e| format!("{origin}: {e}"))?;
    }
    Ok(file.clients)
}

pub fn load_users(path: &Path) -> Result<Vec<User>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_users(&text, &path.display().to_string())
}

pub fn load_clients(path: &Path) -> Result<Vec<Client>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_clients(&text, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_users_cover_the_cases_tests_need() {
        let users = parse_users(DEFAULT_USERS, "users.toml").unwrap();
        let role_counts: Vec<usize> = users.iter().map(|u| u.roles.len()).collect();
        assert_eq!(role_counts, vec![3, 1, 0, 1]);
        let orgs_of_first: std::collections::BTreeSet<_> =
            users[0].roles.iter().map(|r| &r.org_code).collect();
        assert_eq!(orgs_of_first.len(), 2);
        assert!(users[3].authenticators.iter().all(|a| a.level() == 2));
        parse_clients(DEFAULT_CLIENTS, "clients.toml").unwrap();
    }

    #[test]
    fn loopback_redirects_match_any_port_and_nothing_else() {
        let reg = "http://127.0.0.1/callback";
        assert!(redirect_uri_matches(reg, "http://127.0.0.1:49152/callback"));
        assert!(redirect_uri_matches(reg, "http://127.0.0.1/callback"));
        assert!(!redirect_uri_matches(reg, "http://127.0.0.1:49152/other"));
        assert!(!redirect_uri_matches(
            reg,
            "http://localhost:49152/callback"
        ));
        assert!(!redirect_uri_matches(
            reg,
            "http://127.0.0.2.evil.example/callback"
        ));
        assert!(!redirect_uri_matches(reg, "https://127.0.0.1:1/callback"));
        assert!(redirect_uri_matches(
            "http://[::1]/cb",
            "http://[::1]:5000/cb"
        ));
        let web = "https://ehr.example/cb";
        assert!(redirect_uri_matches(web, web));
        assert!(!redirect_uri_matches(web, "https://ehr.example:8443/cb"));
    }

    #[test]
    fn acr_decides_the_authenticators() {
        use Authenticator::*;
        assert!(acr_satisfied_by("AAL3_ANY", Smartcard));
        assert!(!acr_satisfied_by("AAL3_ANY", AuthenticatorApp));
        assert!(acr_satisfied_by("AAL2_OR_AAL3_ANY", AuthenticatorApp));
        assert!(!acr_satisfied_by("AAL3_N3_SMARTCARD", Passkey));
        assert_eq!(
            acr_for(&["AAL3_N3_SMARTCARD".into(), "AAL3_ANY".into()], Passkey).as_deref(),
            Some("AAL3_ANY")
        );
        assert_eq!(acr_for(&["AAL3_ANY".into()], Nhsmail), None);
    }

    #[test]
    fn a_private_key_jwt_client_needs_keys() {
        let err = parse_clients(
            "[[clients]]\nclient_id='x'\nauth_method='private_key_jwt'\nredirect_uris=['http://127.0.0.1/cb']\n",
            "c.toml",
        )
        .unwrap_err();
        assert!(err.contains("jwks"), "{err}");
    }
}
