//! Backend services: who may use the service listener, and with what rights.

/// The role of an API key. Issue-level detail (scopes, organizations) narrows this later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceRole {
    Admin,
    Operator,
    Viewer,
}

impl ServiceRole {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(ServiceRole::Admin),
            "operator" => Some(ServiceRole::Operator),
            "viewer" => Some(ServiceRole::Viewer),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ServiceRole::Admin => "admin",
            ServiceRole::Operator => "operator",
            ServiceRole::Viewer => "viewer",
        }
    }

    /// Operators and admins may send commands and cohort updates; viewers only read.
    pub fn may_command(self) -> bool {
        matches!(self, ServiceRole::Admin | ServiceRole::Operator)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePrincipal {
    pub key_id: String,
    pub role: ServiceRole,
}

/// Checks an API key presented as the MQTT password. Called on the connect path, so an
/// implementation answers from memory.
pub trait ServiceAuth: Send + Sync + 'static {
    fn authenticate(&self, api_key: &str) -> Option<ServicePrincipal>;
}
