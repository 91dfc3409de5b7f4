//! The one module that owns the naming scheme on the bus.
//!
//! Every subject the system publishes to or subscribes on is built here from validated parts;
//! business code never `format!`s a subject. The scheme (all lower-case roots, `.`-separated):
//!
//! | what                         | subject                                        |
//! |------------------------------|------------------------------------------------|
//! | endpoint, load-balanced      | `dyn.ep.{ns}.{component}.{endpoint}` (queue group = the same string) |
//! | endpoint, one instance       | `dyn.ep.{ns}.{component}.{endpoint}.{instance}` |
//! | control (cancel), instance   | `dyn.ctl.{ns}.{component}.{endpoint}.{instance}` |
//! | control (cancel), broadcast  | `dyn.ctl.{ns}.{component}.{endpoint}`           |
//! | events of a component        | `dyn.ev.{ns}.{component}.{topic}.{instance}`    |
//! | discovery key                | `{ns}.{component}.{endpoint}.{instance}` (a key in the discovery bucket) |
//! | an instance's process died   | `dyn.gone.{instance}` (published by its supervisor)   |
//!
//! Instance ids are printed as 16 lower-case hex digits. Name parts (namespace, component,
//! endpoint, topic) are 1 to 64 characters of ASCII letters, digits, `-` and `_`, starting with a
//! letter or digit: they can never contain a `.` or a wildcard, so a part can never change how
//! many tokens a subject has.
//!
//! Invariant: a [`Subject`] never contains wildcards and is a valid NATS subject; a
//! [`SubjectPattern`] is a valid NATS subscription pattern (`*` matches one token, `>` one or
//! more trailing tokens).

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Why a name part or subject was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("invalid {kind} name {value:?}: {reason}")]
    InvalidName {
        kind: NameKind,
        value: String,
        reason: &'static str,
    },
    #[error("invalid subject {value:?}: {reason}")]
    InvalidSubject { value: String, reason: &'static str },
}

/// Which kind of name part failed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Namespace,
    Component,
    Endpoint,
    Topic,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Namespace => "namespace",
            NameKind::Component => "component",
            NameKind::Endpoint => "endpoint",
            NameKind::Topic => "topic",
        })
    }
}

const MAX_NAME_LEN: usize = 64;

fn validate_name(kind: NameKind, value: &str) -> Result<(), SubjectError> {
    let err = |reason| SubjectError::InvalidName {
        kind,
        value: value.to_string(),
        reason,
    };
    let first = value.chars().next().ok_or_else(|| err("is empty"))?;
    if value.len() > MAX_NAME_LEN {
        return Err(err("is longer than 64 characters"));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(err("must start with an ASCII letter or digit"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(err(
            "may contain only ASCII letters, digits, '-' and '_' (no '.', '*', '>' or spaces)",
        ));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, SubjectError> {
                let value = value.into();
                validate_name($kind, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = SubjectError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A namespace: isolates one deployment's components from another's on a shared bus.
    Namespace,
    NameKind::Namespace
);
name_type!(
    /// A component name (a role's service, e.g. `backend`, `router`).
    ComponentName,
    NameKind::Component
);
name_type!(
    /// An endpoint of a component (e.g. `generate`).
    EndpointName,
    NameKind::Endpoint
);
name_type!(
    /// An event topic of a component (e.g. `kv_events`).
    Topic,
    NameKind::Topic
);

/// One running instance of a component. Random 64-bit, printed as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstanceId(u64);

impl InstanceId {
    /// The raw value (routers key workers by it).
    pub fn as_u64(self) -> u64 {
        self.0
    }

    pub fn new(raw: u64) -> Self {
        Self(raw)
    }

    pub fn random() -> Self {
        Self(rand::random())
    }

    /// Parses the 16-hex-digit form used in subjects and discovery keys.
    pub fn parse_hex(s: &str) -> Result<Self, SubjectError> {
        if s.len() != 16 {
            return Err(SubjectError::InvalidSubject {
                value: s.to_string(),
                reason: "an instance id is 16 hex digits",
            });
        }
        u64::from_str_radix(s, 16)
            .map(Self)
            .map_err(|_| SubjectError::InvalidSubject {
                value: s.to_string(),
                reason: "an instance id is 16 hex digits",
            })
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A namespace plus a component: what a service is called on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ComponentId {
    pub namespace: Namespace,
    pub component: ComponentName,
}

impl ComponentId {
    pub fn new(namespace: &str, component: &str) -> Result<Self, SubjectError> {
        Ok(Self {
            namespace: Namespace::new(namespace)?,
            component: ComponentName::new(component)?,
        })
    }

    pub fn endpoint(&self, endpoint: &str) -> Result<EndpointId, SubjectError> {
        Ok(EndpointId {
            component: self.clone(),
            endpoint: EndpointName::new(endpoint)?,
        })
    }

    /// Where instance `instance` publishes events of `topic`.
    pub fn event_subject(&self, topic: &Topic, instance: InstanceId) -> Subject {
        Subject::own(format!(
            "dyn.ev.{}.{}.{}.{}",
            self.namespace, self.component, topic, instance
        ))
    }

    /// Matches every instance's events of `topic`.
    pub fn event_pattern(&self, topic: &Topic) -> SubjectPattern {
        SubjectPattern(format!(
            "dyn.ev.{}.{}.{}.*",
            self.namespace, self.component, topic
        ))
    }

    /// Matches every component's events of `topic` in `namespace` (component and instance are
    /// the subject's 4th and last tokens).
    pub fn namespace_event_pattern(namespace: &Namespace, topic: &Topic) -> SubjectPattern {
        SubjectPattern(format!("dyn.ev.{namespace}.*.{topic}.*"))
    }

    /// The NATS service-protocol name of this component (`{ns}-{component}`).
    pub fn service_name(&self) -> String {
        format!("{}-{}", self.namespace, self.component)
    }
}

impl fmt::Display for ComponentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.namespace, self.component)
    }
}

/// A namespace, component and endpoint: an addressable operation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EndpointId {
    pub component: ComponentId,
    pub endpoint: EndpointName,
}

impl EndpointId {
    pub fn new(namespace: &str, component: &str, endpoint: &str) -> Result<Self, SubjectError> {
        ComponentId::new(namespace, component)?.endpoint(endpoint)
    }

    /// Parses `ns.component.endpoint`.
    pub fn parse(path: &str) -> Result<Self, SubjectError> {
        let parts: Vec<&str> = path.split('.').collect();
        match parts.as_slice() {
            [ns, c, e] => Self::new(ns, c, e),
            _ => Err(SubjectError::InvalidSubject {
                value: path.to_string(),
                reason: "expected namespace.component.endpoint",
            }),
        }
    }

    /// The load-balanced subject: any one instance answers.
    pub fn subject(&self) -> Subject {
        Subject::own(format!(
            "dyn.ep.{}.{}.{}",
            self.component.namespace, self.component.component, self.endpoint
        ))
    }

    /// The queue group every instance of this endpoint joins.
    pub fn queue_group(&self) -> QueueGroup {
        QueueGroup(self.subject().0.to_string())
    }

    /// One instance's own subject.
    pub fn instance_subject(&self, instance: InstanceId) -> Subject {
        Subject::own(format!("{}.{}", self.subject().0, instance))
    }

    /// Where callers send control messages (cancellation) meant for one instance.
    pub fn control_subject(&self, instance: InstanceId) -> Subject {
        Subject::own(format!(
            "{}.{}",
            self.control_broadcast_subject().0,
            instance
        ))
    }

    /// Where callers send control messages when they do not know which instance took a request.
    pub fn control_broadcast_subject(&self) -> Subject {
        Subject::own(format!(
            "dyn.ctl.{}.{}.{}",
            self.component.namespace, self.component.component, self.endpoint
        ))
    }

    /// The discovery key of one instance of this endpoint.
    pub fn discovery_key(&self, instance: InstanceId) -> String {
        format!("{}.{}", self, instance)
    }

    /// The discovery-key filter matching every instance of this endpoint.
    pub fn discovery_filter(&self) -> DiscoveryFilter {
        DiscoveryFilter(format!("{self}.*"))
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.component, self.endpoint)
    }
}

/// A filter over discovery keys, NATS-wildcard style (built only here).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DiscoveryFilter(String);

impl DiscoveryFilter {
    pub fn all() -> Self {
        Self(">".to_string())
    }

    /// Every instance in one namespace.
    pub fn namespace(namespace: &Namespace) -> Self {
        Self(format!("{namespace}.>"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, key: &str) -> bool {
        pattern_matches(&self.0, key)
    }
}

/// Where a supervisor announces that `instance`'s process died (empty payload): callers
/// streaming from it stop waiting at once.
pub fn gone_subject(instance: InstanceId) -> Subject {
    Subject::own(format!("dyn.gone.{instance}"))
}

/// Every [`gone_subject`].
pub fn gone_pattern() -> SubjectPattern {
    SubjectPattern("dyn.gone.*".into())
}

/// A concrete subject: no wildcards. Shared, not copied: a streamed token's frame clones
/// its reply subject on the way out and each subscriber's copy on the way in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject(Arc<str>);

impl Subject {
    /// Validates a raw subject (e.g. one received from the bus, or an inbox).
    pub fn parse(value: impl Into<String>) -> Result<Self, SubjectError> {
        let value = value.into();
        validate_tokens(&value, false)?;
        Ok(Self::own(value))
    }

    fn own(value: String) -> Self {
        Self(value.into())
    }

    /// A subject the bus delivered: the server validated it already.
    pub(crate) fn from_bus(value: String) -> Self {
        Self::own(value)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last `.`-separated token.
    pub fn last_token(&self) -> &str {
        self.0.rsplit('.').next().unwrap_or(&self.0)
    }

    /// The component and instance token of an event subject
    /// (`dyn.ev.{ns}.{component}.{topic}.{instance}`); `None` for any other subject.
    pub fn event_source(&self) -> Option<(&str, &str)> {
        let mut t = self.0.split('.');
        match [(); 7].map(|_| t.next()) {
            [Some("dyn"), Some("ev"), Some(_), Some(component), Some(_), Some(instance), None] => {
                Some((component, instance))
            }
            _ => None,
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A subscription pattern: a subject whose tokens may be `*`, and whose last token may be `>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubjectPattern(String);

impl SubjectPattern {
    pub fn parse(value: impl Into<String>) -> Result<Self, SubjectError> {
        let value = value.into();
        validate_tokens(&value, true)?;
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn has_wildcards(&self) -> bool {
        self.0.split('.').any(|t| t == "*" || t == ">")
    }

    /// NATS matching: `*` is one token, a final `>` is one or more tokens.
    pub fn matches(&self, subject: &Subject) -> bool {
        pattern_matches(&self.0, &subject.0)
    }
}

impl From<Subject> for SubjectPattern {
    fn from(s: Subject) -> Self {
        SubjectPattern(s.0.to_string())
    }
}

impl From<&Subject> for SubjectPattern {
    fn from(s: &Subject) -> Self {
        SubjectPattern(s.0.to_string())
    }
}

impl fmt::Display for SubjectPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A queue group: of all subscribers in one group, one gets each message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QueueGroup(String);

impl QueueGroup {
    pub fn new(value: impl Into<String>) -> Result<Self, SubjectError> {
        let value = value.into();
        validate_tokens(&value, false)?;
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The NATS micro-protocol subjects an instance of `service` with id `id` answers:
/// `$SRV.{verb}`, `$SRV.{verb}.{service}`, `$SRV.{verb}.{service}.{id}`.
pub(crate) fn service_protocol_subjects(service: &str, id: &str) -> Vec<(ServiceVerb, Subject)> {
    let mut out = Vec::with_capacity(9);
    for verb in [ServiceVerb::Ping, ServiceVerb::Info, ServiceVerb::Stats] {
        let v = verb.as_str();
        for s in [
            format!("$SRV.{v}"),
            format!("$SRV.{v}.{service}"),
            format!("$SRV.{v}.{service}.{id}"),
        ] {
            out.push((verb, Subject::own(s)));
        }
    }
    out
}

/// The subject a discovery client sends a service-protocol query to, for every service.
pub fn service_query_subject(verb: ServiceVerb) -> Subject {
    Subject::own(format!("$SRV.{}", verb.as_str()))
}

/// The three NATS service-protocol verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceVerb {
    Ping,
    Info,
    Stats,
}

impl ServiceVerb {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceVerb::Ping => "PING",
            ServiceVerb::Info => "INFO",
            ServiceVerb::Stats => "STATS",
        }
    }
}

/// The default root of reply inboxes.
pub const DEFAULT_INBOX_PREFIX: &str = "_INBOX";

/// A fresh inbox (`{prefix}.{nuid}`) for replies; `prefix` is the bus's
/// ([`crate::bus::Bus::inbox_prefix`]), so a role's server permissions can let it subscribe to
/// its own replies only.
pub(crate) fn new_inbox(prefix: &str) -> Subject {
    Subject::own(format!("{prefix}.{}", nuid::next()))
}

/// Checks an inbox prefix: one or more subject tokens, no wildcards.
pub fn validate_inbox_prefix(prefix: &str) -> Result<(), SubjectError> {
    validate_tokens(prefix, false)
}

/// A multiplexed reply inbox: `_INBOX.{nuid}.{token}` per call, one `_INBOX.{nuid}.*`
/// subscription for all.
#[derive(Debug, Clone)]
pub(crate) struct MuxInbox(Subject);

impl MuxInbox {
    pub fn new(prefix: &str) -> Self {
        Self(new_inbox(prefix))
    }

    pub fn pattern(&self) -> SubjectPattern {
        SubjectPattern(format!("{}.*", self.0))
    }

    pub fn reply(&self, token: u64) -> Subject {
        Subject::own(format!("{}.{token}", self.0))
    }

    /// The token of a reply subject of this inbox.
    pub fn token(subject: &Subject) -> Option<u64> {
        subject.last_token().parse().ok()
    }
}

fn validate_tokens(value: &str, allow_wildcards: bool) -> Result<(), SubjectError> {
    let err = |reason| SubjectError::InvalidSubject {
        value: value.to_string(),
        reason,
    };
    if value.is_empty() {
        return Err(err("is empty"));
    }
    let tokens: Vec<&str> = value.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        if t.is_empty() {
            return Err(err("has an empty token"));
        }
        if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err("contains whitespace or control characters"));
        }
        let is_wild = *t == "*" || *t == ">";
        if !is_wild && (t.contains('*') || t.contains('>')) {
            return Err(err("a wildcard must be a whole token"));
        }
        if is_wild && !allow_wildcards {
            return Err(err("wildcards are not allowed here"));
        }
        if *t == ">" && i + 1 != tokens.len() {
            return Err(err("'>' must be the last token"));
        }
    }
    Ok(())
}

/// NATS wildcard matching over `.`-separated tokens.
pub(crate) fn pattern_matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for p in pattern.split('.') {
        match p {
            ">" => return subject_tokens.next().is_some(),
            "*" => {
                if subject_tokens.next().is_none() {
                    return false;
                }
            }
            lit => {
                if subject_tokens.next() != Some(lit) {
                    return false;
                }
            }
        }
    }
    subject_tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_event_subject_names_its_component_and_instance() {
        let c = ComponentId::new("ns", "backend").unwrap();
        let subject = c.event_subject(&Topic::new("load").unwrap(), InstanceId::new(255));
        assert_eq!(
            subject.event_source(),
            Some(("backend", "00000000000000ff"))
        );
        let ep = c.endpoint("generate").unwrap();
        assert_eq!(ep.subject().event_source(), None);
        assert_eq!(ep.instance_subject(InstanceId::new(1)).event_source(), None);
    }

    #[test]
    fn names_reject_what_would_change_a_subject() {
        for bad in ["", "a.b", "a*", ">", "a b", "-lead", "é", &"x".repeat(65)] {
            let e = Namespace::new(bad).unwrap_err();
            assert!(
                matches!(
                    e,
                    SubjectError::InvalidName {
                        kind: NameKind::Namespace,
                        ..
                    }
                ),
                "{bad:?}"
            );
        }
        for good in ["dynamo", "a", "my_ns-2", "0abc"] {
            assert_eq!(Namespace::new(good).unwrap().as_str(), good);
        }
        assert!(matches!(
            EndpointId::new("ns", "comp", "gen.x"),
            Err(SubjectError::InvalidName {
                kind: NameKind::Endpoint,
                ..
            })
        ));
    }

    #[test]
    fn names_are_validated_when_deserialized() {
        let ok: Namespace = serde_json::from_str("\"dynamo\"").unwrap();
        assert_eq!(ok.as_str(), "dynamo");
        assert!(serde_json::from_str::<Namespace>("\"a.b\"").is_err());
    }

    #[test]
    fn scheme() {
        let ep = EndpointId::new("dynamo", "backend", "generate").unwrap();
        let i = InstanceId::new(0xab);
        assert_eq!(ep.subject().as_str(), "dyn.ep.dynamo.backend.generate");
        assert_eq!(
            ep.instance_subject(i).as_str(),
            "dyn.ep.dynamo.backend.generate.00000000000000ab"
        );
        assert_eq!(
            ep.control_subject(i).as_str(),
            "dyn.ctl.dynamo.backend.generate.00000000000000ab"
        );
        assert_eq!(
            ep.discovery_key(i),
            "dynamo.backend.generate.00000000000000ab"
        );
        assert!(ep.discovery_filter().matches(&ep.discovery_key(i)));
        let topic = Topic::new("kv_events").unwrap();
        let s = ep.component.event_subject(&topic, i);
        assert!(ep.component.event_pattern(&topic).matches(&s));
        assert_eq!(InstanceId::parse_hex(&i.to_string()).unwrap(), i);
        assert!(InstanceId::parse_hex("xyz").is_err());
    }

    #[test]
    fn subjects_and_patterns_validate() {
        assert!(Subject::parse("a.b.c").is_ok());
        for bad in ["", "a..b", "a.*", "a.>", "a b", "a.b*"] {
            assert!(Subject::parse(bad).is_err(), "{bad:?}");
        }
        assert!(SubjectPattern::parse("a.*.c").is_ok());
        assert!(SubjectPattern::parse("a.>").is_ok());
        assert!(SubjectPattern::parse("a.>.c").is_err());
    }

    #[test]
    fn wildcards_match_like_nats() {
        let cases = [
            ("a.b.c", "a.b.c", true),
            ("a.*.c", "a.b.c", true),
            ("a.*", "a.b.c", false),
            ("a.>", "a.b.c", true),
            ("a.>", "a", false),
            (">", "a", true),
            ("*", "a.b", false),
            ("a.*.>", "a.b", false),
            ("a.*.>", "a.b.c.d", true),
        ];
        for (p, s, want) in cases {
            assert_eq!(pattern_matches(p, s), want, "{p} vs {s}");
        }
    }

    proptest! {
        // A literal pattern matches exactly itself; `>` as last token matches every extension.
        #[test]
        fn literal_and_tail_wildcards(tokens in prop::collection::vec("[a-z0-9]{1,4}", 1..6), extra in prop::collection::vec("[a-z0-9]{1,4}", 1..3)) {
            let s = tokens.join(".");
            prop_assert!(pattern_matches(&s, &s));
            let longer = format!("{s}.{}", extra.join("."));
            prop_assert!(!pattern_matches(&s, &longer));
            let tail = format!("{s}.>");
            prop_assert!(pattern_matches(&tail, &longer));
            let stars = vec!["*"; tokens.len()].join(".");
            prop_assert!(pattern_matches(&stars, &s));
            prop_assert!(!pattern_matches(&stars, &longer));
        }
    }
}
