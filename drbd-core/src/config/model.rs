//! The typed model: one resource as this node will run it, with `common` merged in, every
//! option given its default and unit, and every value checked.
//!
//! `drbdadm dump` prints the syntax tree as written; everything that acts on a resource (the
//! metadata commands, the daemon) goes through this model instead, so a value that the syntax
//! accepts but DRBD cannot use (an unknown policy name, a number out of range) is refused here
//! with the option's name and the offending value.

use std::fmt;

use super::options::{self, parse_scaled, Class};
use super::{Address, Config, HostKind, Opt};

/// Why a resource cannot be used as configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("'{0}' not defined in your config (for this host).")]
    UnknownResource(String),
    #[error("{file}:{line}: in resource {resource}: no host section for this node ({node})")]
    NotOnThisNode {
        file: String,
        line: u32,
        resource: String,
        node: String,
    },
    #[error("in resource {resource}: {option} '{value}': {reason}")]
    BadValue {
        resource: String,
        option: String,
        value: String,
        reason: String,
    },
    #[error("in resource {resource}: {reason}")]
    Invalid { resource: String, reason: String },
}

/// Replication protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Complete when the write is on the local disk and in the send buffer.
    A,
    /// Complete when the peer has received the write.
    B,
    /// Complete when the write is on both disks.
    C,
}

/// Where the metadata of a volume lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaDisk {
    /// At the end of the backing device.
    Internal,
    /// A whole device of its own, sized to fit ("flexible external").
    FlexExternal(String),
    /// Slot `index` (128 MiB each) of a shared metadata device.
    Indexed(String, u32),
}

/// One volume of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeModel {
    pub vnr: u32,
    pub minor: u32,
    pub device: String,
    pub disk: String,
    pub meta: MetaDisk,
    /// Disk options after inheritance (resource, common), as written.
    pub disk_options: Vec<Opt>,
}

/// A resource as this node runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceModel {
    pub name: String,
    pub node: String,
    pub volumes: Vec<VolumeModel>,
    pub address: Option<Address>,
    pub peer_name: Option<String>,
    pub peer_address: Option<Address>,
    pub net: Vec<Opt>,
    pub disk: Vec<Opt>,
    pub startup: Vec<Opt>,
    pub handlers: Vec<Opt>,
    pub options: Vec<Opt>,
}

impl ResourceModel {
    /// Builds the model of resource `name` for `cfg.node`, merging `common` the way drbdadm
    /// does (a resource's own setting wins; common fills in what it does not set).
    pub fn new(cfg: &Config, name: &str) -> Result<Self, ModelError> {
        let res = cfg
            .resource(name)
            .ok_or_else(|| ModelError::UnknownResource(name.into()))?;
        let Some(me) = res.me else {
            return Err(ModelError::NotOnThisNode {
                file: res.file.clone(),
                line: res.line,
                resource: name.into(),
                node: cfg.node.clone(),
            });
        };
        let mut merged = res.clone();
        if let Some(common) = &cfg.common {
            expand(&common.net, &mut merged.net);
            expand(&common.disk, &mut merged.disk);
            expand(&common.startup, &mut merged.startup);
            expand(&common.handlers, &mut merged.handlers);
            expand(&common.options, &mut merged.options);
        }
        let host = &res.hosts[me];
        let peer = res.peer.map(|p| &res.hosts[p]);
        let mut volumes = Vec::new();
        for v in &host.volumes {
            let bad = |reason: &str| ModelError::Invalid {
                resource: name.into(),
                reason: format!("volume {}: {reason}", v.vnr),
            };
            let minor = v.minor.ok_or_else(|| bad("no minor"))?;
            let disk = match (&v.disk, &host.kind) {
                (Some(d), _) => d.clone(),
                (None, HostKind::Stacked { .. }) => format!("/dev/drbd{minor}"),
                (None, _) => return Err(bad("no disk")),
            };
            let meta = match (v.meta_disk.as_deref(), v.meta_index.as_deref()) {
                (Some("internal"), _) | (_, Some("internal")) => MetaDisk::Internal,
                (Some(dev), Some("flexible")) => MetaDisk::FlexExternal(dev.into()),
                (Some(dev), Some(idx)) => MetaDisk::Indexed(
                    dev.into(),
                    idx.parse()
                        .map_err(|_| bad(&format!("meta-disk index '{idx}' is not a number")))?,
                ),
                _ => return Err(bad("no meta-disk")),
            };
            let mut disk_options = v.disk_options.clone();
            expand(&merged.disk, &mut disk_options);
            volumes.push(VolumeModel {
                vnr: v.vnr,
                minor,
                device: v
                    .device
                    .clone()
                    .unwrap_or_else(|| format!("/dev/drbd{minor}")),
                disk,
                meta,
                disk_options,
            });
        }
        let model = ResourceModel {
            name: name.into(),
            node: cfg.node.clone(),
            volumes,
            address: host.address.clone(),
            peer_name: peer.and_then(|p| p.on_hosts.first().cloned()),
            peer_address: peer.and_then(|p| p.address.clone()),
            net: merged.net,
            disk: merged.disk,
            startup: merged.startup,
            handlers: merged.handlers,
            options: merged.options,
        };
        model.check()?;
        Ok(model)
    }

    fn section(&self, class: Class) -> &[Opt] {
        match class {
            Class::NetOption | Class::NetFlag | Class::NetNoFlag | Class::NetDelegate => &self.net,
            Class::DiskOption | Class::DiskFlag | Class::DiskNoFlag => &self.disk,
            Class::StartupOption | Class::StartupFlag | Class::StartupDelegate => &self.startup,
            Class::Handler => &self.handlers,
            _ => &self.options,
        }
    }

    /// The effective value of an option: the last one written, else DRBD's default.
    pub fn value(&self, name: &str) -> Option<String> {
        let info = options::lookup(name)?;
        self.section(info.class)
            .iter()
            .rev()
            .find(|o| o.name == name)
            .and_then(|o| o.value.clone())
            .or_else(|| info.default.map(str::to_string))
    }

    /// A numeric option in its own unit (KiB for rates, sectors for sizes, tenths of a second
    /// for `timeout`, ...). None for an option that is not numeric or has no value.
    pub fn number(&self, name: &str) -> Option<u64> {
        let info = options::lookup(name)?;
        let range = info.range?;
        let v = self.value(name)?;
        parse_scaled(&v, range.scale).ok()
    }

    /// A yes/no option.
    pub fn flag(&self, name: &str) -> bool {
        self.value(name).as_deref() == Some("yes")
    }

    pub fn protocol(&self) -> Protocol {
        match self.value("protocol").as_deref() {
            Some("A") => Protocol::A,
            Some("B") => Protocol::B,
            _ => Protocol::C,
        }
    }

    /// A handler's command line, if configured.
    pub fn handler(&self, name: &str) -> Option<String> {
        self.handlers
            .iter()
            .rev()
            .find(|o| o.name == name)
            .and_then(|o| o.value.clone())
    }

    /// Checks every option's value against its range or value list.
    fn check(&self) -> Result<(), ModelError> {
        let sections = [&self.net, &self.disk, &self.startup, &self.options];
        for opts in sections
            .into_iter()
            .chain(self.volumes.iter().map(|v| &v.disk_options))
        {
            for o in opts {
                let Some(info) = options::lookup(&o.name) else {
                    continue;
                };
                let Some(value) = &o.value else { continue };
                let bad = |reason: String| ModelError::BadValue {
                    resource: self.name.clone(),
                    option: o.name.clone(),
                    value: value.clone(),
                    reason,
                };
                if let Some(range) = info.range {
                    let v =
                        parse_scaled(value, range.scale).map_err(|_| bad("not a number".into()))?;
                    if v < range.min || v > range.max {
                        return Err(bad(format!("out of range [{}..{}]", range.min, range.max)));
                    }
                }
                if matches!(
                    info.class,
                    Class::NetFlag | Class::DiskFlag | Class::StartupFlag
                ) && !options::FLAG_VALUES.contains(&value.as_str())
                {
                    return Err(bad("expected yes or no".into()));
                }
                if let Some(values) = info.values {
                    let ok = values.contains(&value.as_str())
                        || (o.name == "after-sb-0pri" && value.starts_with("discard-node-"));
                    if !ok {
                        return Err(bad(format!("expected one of {}", values.join(", "))));
                    }
                }
            }
        }
        if self.flag("allow-two-primaries") && self.protocol() != Protocol::C {
            return Err(ModelError::Invalid {
                resource: self.name.clone(),
                reason: "allow-two-primaries requires protocol C".into(),
            });
        }
        Ok(())
    }
}

/// Adds the options of `from` that `to` does not set (drbdadm's common inheritance).
fn expand(from: &[Opt], to: &mut Vec<Opt>) {
    let mut added: Vec<Opt> = from
        .iter()
        .filter(|o| !to.iter().any(|t| t.name == o.name))
        .cloned()
        .collect();
    added.reverse();
    for o in added {
        to.insert(0, o);
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::A => "A",
            Protocol::B => "B",
            Protocol::C => "C",
        })
    }
}
