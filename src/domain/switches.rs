//! Degradation switches (P9, and crediting pause for operators): named on/off flags changed
//! at run time by an admin, recorded as events so that the audit sees every change.

use super::{Aggregate, ChangedBy, Ctx, Decision, Event};
use crate::clock::Millis;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Every switch, with its default: an unknown name is refused, so a typo cannot silently
/// create a switch nobody reads.
pub const KNOWN: &[(&str, bool, &str)] = &[
    (
        "reward_lanes",
        true,
        "Crediting lanes dispatch credits (off: rewards are still accepted and queue up, pending)",
    ),
    (
        "c2c_send",
        true,
        "Users may create C2C red packets (off: 503 with a friendly message, e.g. while the cashier is down)",
    ),
    (
        "token_merge",
        true,
        "Reward and subsidy listings merge pending tokens with credited ones (off: credited only)",
    ),
];

/// The default of a known switch.
pub fn default_of(name: &str) -> Option<bool> {
    KNOWN
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, on, _)| *on)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetSwitch {
    pub name: String,
    pub on: bool,
    pub by: ChangedBy,
}

/// Variants are only appended (the codec stores the index): `SwitchSet` is the old shape,
/// still decoded, with no record of who changed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SwitchEvent {
    SwitchSet {
        name: String,
        on: bool,
    },
    /// A switch changed by the key `by`.
    SwitchChanged {
        name: String,
        on: bool,
        by: ChangedBy,
        at_ms: Millis,
    },
}

impl SwitchEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            SwitchEvent::SwitchSet { .. } => "switches.switch_set",
            SwitchEvent::SwitchChanged { .. } => "switches.switch_changed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum SwitchError {
    #[error("no switch named {0}")]
    Unknown(String),
}

/// The switches' state: only those set away from their default are stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switches {
    pub set: BTreeMap<String, bool>,
    /// Who last changed each switch, and when (absent: never changed, or only by an event
    /// recorded before changes named their key).
    pub changed_by: BTreeMap<String, (ChangedBy, Millis)>,
}

impl Switches {
    pub fn is_on(&self, name: &str) -> bool {
        self.set
            .get(name)
            .copied()
            .or_else(|| default_of(name))
            .unwrap_or(false)
    }

    /// Every known switch with its current value.
    pub fn all(&self) -> BTreeMap<String, bool> {
        KNOWN
            .iter()
            .map(|(name, _, _)| (name.to_string(), self.is_on(name)))
            .collect()
    }
}

impl Aggregate for Switches {
    type Command = SetSwitch;
    type Event = SwitchEvent;
    type Reply = BTreeMap<String, bool>;
    type Error = SwitchError;

    const STREAM_PREFIX: &'static str = "switches";

    fn decide(
        &self,
        command: &SetSwitch,
        ctx: &Ctx,
    ) -> Result<Decision<SwitchEvent, Self::Reply>, SwitchError> {
        if default_of(&command.name).is_none() {
            return Err(SwitchError::Unknown(command.name.clone()));
        }
        if self.is_on(&command.name) == command.on {
            return Ok(Decision::Reply(self.all()));
        }
        let mut after = self.clone();
        let event = SwitchEvent::SwitchChanged {
            name: command.name.clone(),
            on: command.on,
            by: command.by.clone(),
            at_ms: ctx.now_ms,
        };
        after.evolve(&event);
        Ok(Decision::Emit(vec![event], after.all()))
    }

    fn evolve(&mut self, event: &SwitchEvent) {
        match event {
            SwitchEvent::SwitchSet { name, on } => {
                self.set.insert(name.clone(), *on);
                self.changed_by.remove(name);
            }
            SwitchEvent::SwitchChanged {
                name,
                on,
                by,
                at_ms,
            } => {
                self.set.insert(name.clone(), *on);
                self.changed_by.insert(name.clone(), (by.clone(), *at_ms));
            }
        }
    }

    fn correlation_id(command: &SetSwitch) -> String {
        format!("switch:{}", command.name)
    }

    fn wrap(event: SwitchEvent) -> Event {
        Event::Switches(event)
    }

    fn unwrap(event: &Event) -> Option<&SwitchEvent> {
        match event {
            Event::Switches(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: Ctx = Ctx { now_ms: 0 };

    fn admin() -> ChangedBy {
        ChangedBy {
            role: "admin".into(),
            key_id: "0123abcd".into(),
        }
    }

    #[test]
    fn switches_default_flip_and_refuse_unknown_names() {
        // Goal: known switches start at their default, a change is one event, a repeat is a
        // no-op, an unknown name is refused.
        let switches = Switches::default();
        assert!(switches.is_on("reward_lanes"));
        let off = SetSwitch {
            name: "reward_lanes".into(),
            on: false,
            by: admin(),
        };
        let Ok(Decision::Emit(events, all)) = switches.decide(&off, &CTX) else {
            panic!()
        };
        assert_eq!(all.get("reward_lanes"), Some(&false));
        let switches = crate::domain::replay(switches, &events);
        assert!(!switches.is_on("reward_lanes"));
        assert_eq!(switches.changed_by.get("reward_lanes"), Some(&(admin(), 0)));
        assert!(matches!(
            switches.decide(&off, &CTX),
            Ok(Decision::Reply(_))
        ));
        let typo = SetSwitch {
            name: "reward_lane".into(),
            on: false,
            by: admin(),
        };
        assert_eq!(
            switches.decide(&typo, &CTX),
            Err(SwitchError::Unknown("reward_lane".into()))
        );
    }

    #[test]
    fn an_old_switch_event_still_decodes_and_replays_without_a_changer() {
        // Goal: events recorded before changes named their key keep their variant index and
        // still decode and replay; the new variant comes after them.
        let old = Event::Switches(SwitchEvent::SwitchSet {
            name: "c2c_send".into(),
            on: false,
        });
        let bytes = crate::events::codec::encode(&old).unwrap();
        let decoded: Event = crate::events::codec::decode(&bytes).unwrap();
        assert_eq!(decoded, old);
        let Event::Switches(event) = decoded else {
            panic!()
        };
        let switches = crate::domain::replay(Switches::default(), [&event]);
        assert!(!switches.is_on("c2c_send"));
        assert!(switches.changed_by.is_empty());
        let new = SwitchEvent::SwitchChanged {
            name: "c2c_send".into(),
            on: true,
            by: admin(),
            at_ms: 5,
        };
        // Byte 0 is the codec's format byte; byte 1 the variant index.
        let index = |e: &SwitchEvent| crate::events::codec::encode(e).unwrap()[1];
        assert_eq!((index(&event), index(&new)), (0, 1));
    }
}
