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

    /// Parsed by the `url` crate; our rules on top: scheme `mqtt` or `mqtts`, nothing but a
    /// host and an optional port (default 1883 or 8883), and no IPv6 literal.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let url = url::Url::parse(s).map_err(|e| match e {
            url::ParseError::RelativeUrlWithoutBase => ConfigError::InvalidUrl(format!(
                "{s:?} has no scheme; expected mqtt://host:port or mqtts://host:port"
            )),
            e => ConfigError::InvalidUrl(format!("{s:?}: {e}")),
        })?;
        let scheme = match url.scheme() {
            "mqtt" => Scheme::Mqtt,
            "mqtts" => Scheme::Mqtts,
            other => {
                return Err(ConfigError::InvalidUrl(format!(
                    "unsupported scheme {other:?}; expected mqtt or mqtts"
                )))
            }
        };
        if !url.username().is_empty()
            || url.password().is_some()
            || !matches!(url.path(), "" | "/")
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(ConfigError::InvalidUrl(format!(
                "{s:?}: only scheme://host[:port] is supported (no path, query or user info)"
            )));
        }
        let host = match url.host() {
            Some(url::Host::Domain(name)) => name.to_owned(),
            Some(url::Host::Ipv4(addr)) => addr.to_string(),
            Some(url::Host::Ipv6(_)) => {
                return Err(ConfigError::InvalidUrl(
                    "IPv6 literals are not supported; use a host name".into(),
                ))
            }
            None => String::new(),
        };
        BrokerUrl::new(scheme, &host, url.port().unwrap_or(scheme.default_port()))
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
            ("mqtt://10.0.0.7:65535", Scheme::Mqtt, "10.0.0.7", 65535),
            (
                "mqtts://broker-1.example:8883",
                Scheme::Mqtts,
                "broker-1.example",
                8883,
            ),
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
            "mqtt://user:pw@host",
            "mqtt://host?x=1",
            "mqtt://host#frag",
            "mqtt://host:1883/path",
            "mqtt://ho%2Fst",
            "tcp://host:1883",
            "",
        ];
        for s in bad {
            assert!(s.parse::<BrokerUrl>().is_err(), "{s}");
        }
        // The errors say what is wrong.
        let cases = [
            ("localhost:1883", "unsupported scheme \"localhost\""),
            ("broker", "has no scheme"),
            ("http://localhost", "unsupported scheme \"http\""),
            ("mqtt://[::1]:1883", "IPv6 literals are not supported"),
            ("mqtt://host/path", "only scheme://host[:port] is supported"),
            ("mqtt://host:0", "port must not be 0"),
            ("mqtt://host:65536", "invalid port number"),
            ("mqtt://", "host is empty"),
        ];
        for (s, want) in cases {
            let e = s.parse::<BrokerUrl>().unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn display_round_trips() {
        let u: BrokerUrl = "mqtts://h.example:9".parse().unwrap();
        assert_eq!(u.to_string(), "mqtts://h.example:9");
        assert_eq!(u.to_string().parse::<BrokerUrl>().unwrap(), u);
    }
}
