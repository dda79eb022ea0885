//! Backend services and operators: who holds an API key, in which organization, with which
//! role and scope. The same principal authorizes the REST bridge and the MQTT service listener.

/// The organization that exists in every installation. Its unscoped admin keys also manage the
/// other organizations (the platform operator); everything else about it is ordinary.
pub const DEFAULT_ORG: &str = "default";

/// The role of an API key.
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

/// What part of its organization a key may see. `Org` is the whole organization; a product or
/// cohort scope narrows the key's role to that product or cohort (and the devices in it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    Org,
    Product {
        product_id: String,
    },
    Cohort {
        product_id: String,
        cohort_id: String,
    },
}

impl Scope {
    /// The product and cohort the scope narrows to (none for the whole organization).
    pub fn narrows_to(&self) -> (Option<&str>, Option<&str>) {
        match self {
            Scope::Org => (None, None),
            Scope::Product { product_id } => (Some(product_id), None),
            Scope::Cohort {
                product_id,
                cohort_id,
            } => (Some(product_id), Some(cohort_id)),
        }
    }
}

/// Where a product-level resource sits: its organization, product and (for cohorts, devices and
/// deployments) cohort. What [`ServicePrincipal::sees`] checks against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place<'a> {
    pub org_id: &'a str,
    pub product_id: &'a str,
    pub cohort_id: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePrincipal {
    pub key_id: String,
    pub org_id: String,
    pub role: ServiceRole,
    pub scope: Scope,
}

impl ServicePrincipal {
    /// Whether the key may see something at `place`. A product-scoped key sees everything in
    /// its product; a cohort-scoped key sees its cohort and what is in it, and the product only
    /// as the cohort's parent (`cohort_id: None` with its product is visible, so it can read
    /// the product the cohort belongs to).
    pub fn sees(&self, place: Place<'_>) -> bool {
        if place.org_id != self.org_id {
            return false;
        }
        match &self.scope {
            Scope::Org => true,
            Scope::Product { product_id } => place.product_id == product_id,
            Scope::Cohort {
                product_id,
                cohort_id,
            } => place.product_id == product_id && place.cohort_id.is_none_or(|c| c == cohort_id),
        }
    }

    /// Whether the key covers every cohort of `product_id` (an org-wide or product key): what
    /// creating or changing product-level things (cohorts, releases) needs.
    pub fn covers_product(&self, org_id: &str, product_id: &str) -> bool {
        org_id == self.org_id
            && match &self.scope {
                Scope::Org => true,
                Scope::Product { product_id: p } => p == product_id,
                Scope::Cohort { .. } => false,
            }
    }

    /// An org-wide key: what organization-level resources (CAs, keys, signing keys) need.
    pub fn org_wide(&self) -> bool {
        self.scope == Scope::Org
    }

    /// An unscoped admin of the default organization: may manage organizations.
    pub fn platform_admin(&self) -> bool {
        self.org_id == DEFAULT_ORG && self.org_wide() && self.role == ServiceRole::Admin
    }
}

/// Checks an API key presented as the MQTT password. Called on the connect path, so an
/// implementation answers from memory.
pub trait ServiceAuth: Send + Sync + 'static {
    fn authenticate(&self, api_key: &str) -> Option<ServicePrincipal>;
}
