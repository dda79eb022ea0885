//! `mqtt://host:port` and `mqtts://host:port` broker addresses.

use std::fmt;
use std::str::FromStr;

use crate::error::ConfigError;

/// Plain TCP or TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `mqtt://`, default port 1883.
    Mqtt,
    /// `mqtts://`, default port 8883.
    Mqtts,
}

impl Scheme {
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Mqtt => 1883,
            Scheme::Mqtts => 8883,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Mqtt => "mqtt",
            Scheme::Mqtts => "mqtts",
        }
    }
}

/// A broker address: scheme, host name or IPv4 address, and port.
///
/// IPv6 literals are refused because the MQTT transport joins host and port as `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BrokerUrl {
    scheme: Scheme,
    host: String,
    port: u16,
}

impl BrokerUrl {
    pub fn new(scheme: Scheme, host: &str, port: u16) -> Result<Self, ConfigError> {
        validate_host(host)?;
        if port == 0 {
            return Err(ConfigError::InvalidUrl("port must not be 0".into()));
        }
        Ok(Self {
            scheme,
            host: host.to_owned(),
            port,
        })
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_tls(&self) -> bool {
        self.scheme == Scheme::Mqtts
    }
}

fn validate_host(host: &str) -> Result<(), ConfigError> {
    if host.is_empty() {
        return Err(ConfigError::InvalidUrl("host is empty".into()));
    }
    if host.starts_with('[') || host.contains(':') {
        return Err(ConfigError::InvalidUrl(
            "IPv6 literals are not supported; use a host name".into(),
        ));
    }
    if let Some(c) = host
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(ConfigError::InvalidUrl(format!(
            "host contains {c:?}; only a host name or IPv4 address is allowed"
        )));
    }
    Ok(())
}

impl FromStr for BrokerUrl {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            ConfigError::InvalidUrl(format!(
                "{s:?} has no scheme; expected mqtt://host:port or mqtts://host:port"
            ))
        })?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "mqtt" => Scheme::Mqtt,
            "mqtts" => Scheme::Mqtts,
            other => {
                return Err(ConfigError::InvalidUrl(format!(
                    "unsupported scheme {other:?}; expected mqtt or mqtts"
                )))
            }
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#', '@']) {
            return Err(ConfigError::InvalidUrl(format!(
                "{s:?}: only scheme://host[:port] is supported (no path, query or user info)"
            )));
        }
        if authority.starts_with('[') {
            return Err(ConfigError::InvalidUrl(
                "IPv6 literals are not supported; use a host name".into(),
            ));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => {
                let port = port
                    .parse::<u16>()
                    .map_err(|_| ConfigError::InvalidUrl(format!("invalid port {port:?}")))?;
                (host, port)
            }
            None => (authority, scheme.default_port()),
        };
        BrokerUrl::new(scheme, host, port)
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme.as_str(), self.host, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let ok: &[(&str, Scheme, &str, u16)] = &[
            ("mqtt://127.0.0.1:1883", Scheme::Mqtt, "127.0.0.1", 1883),
            (
                "mqtts://broker.example.com:8884",
                Scheme::Mqtts,
                "broker.example.com",
                8884,
            ),
            ("mqtt://localhost", Scheme::Mqtt, "localhost", 1883),
            ("mqtts://localhost", Scheme::Mqtts, "localhost", 8883),
            ("MQTTS://localhost:1/", Scheme::Mqtts, "localhost", 1),
        ];
        for (s, scheme, host, port) in ok {
            let u: BrokerUrl = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(
                (u.scheme(), u.host(), u.port()),
                (*scheme, *host, *port),
                "{s}"
            );
        }
        let bad = [
            "localhost:1883",
            "http://localhost",
            "mqtt://",
            "mqtt://:1883",
            "mqtt://host:0",
            "mqtt://host:65536",
            "mqtt://host:port",
            "mqtt://[::1]:1883",
            "mqtt://user@host",
            "mqtt://host/path",
            "mqtt://ho st",
        ];
        for s in bad {
            assert!(s.parse::<BrokerUrl>().is_err(), "{s}");
        }
    }

    #[test]
    fn display_round_trips() {
        let u: BrokerUrl = "mqtts://h.example:9".parse().unwrap();
        assert_eq!(u.to_string(), "mqtts://h.example:9");
        assert_eq!(u.to_string().parse::<BrokerUrl>().unwrap(), u);
    }
}
