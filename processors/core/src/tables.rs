//! Tables every task reads whole, next to per-customer state: stock per SKU (the compacted
//! inventory topic) and each template's status at the provider. The shell keeps them current;
//! the core only reads them, and records what it relied on in its decisions.
//!
//! Template status is only ever reported once, on the provider topic, which keeps a week; so
//! the processors save it with each partition's positions (`saved_positions`) and fold it back
//! on restore, or a template paused before a restart would be sent again after it.

use crate::events::{Fact, Millis, StockLevel, TemplateStatus};
use std::collections::BTreeMap;

/// Stock and template status, as last reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tables {
    /// Latest stock level per SKU.
    pub stock: BTreeMap<String, StockLevel>,
    /// Status reported by the provider per (template name, locale); absent means the catalog's.
    pub template_status: BTreeMap<(String, String), ReportedStatus>,
}

/// A template's status as the provider reported it, and when the report was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportedStatus {
    pub status: TemplateStatus,
    pub at: Millis,
}

impl ReportedStatus {
    /// Orders reports: the later one wins, and at the same instant a fixed order of statuses,
    /// so every partition and every restore settles on the same status.
    fn rank(&self) -> (Millis, u8) {
        (self.at, status_code(self.status))
    }
}

/// Prefix of the saved-position keys that hold template statuses, next to the input topics'.
pub const TEMPLATE_STATUS_KEY_PREFIX: &str = "~template-status:";

const STATUSES: [TemplateStatus; 5] = [
    TemplateStatus::Approved,
    TemplateStatus::Pending,
    TemplateStatus::Paused,
    TemplateStatus::Disabled,
    TemplateStatus::Rejected,
];

fn status_code(s: TemplateStatus) -> u8 {
    STATUSES.iter().position(|x| *x == s).unwrap_or(0) as u8
}

/// What the stock table says about a SKU at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stock {
    InStock(i32),
    OutOfStock,
    /// No level, or one measured too long ago to trust.
    Unknown,
}

impl Tables {
    /// Takes in a template status change reported at `occurred_at`; an earlier report never
    /// replaces a later one. Other facts do not touch the tables. Whether it changed anything.
    pub fn observe(&mut self, fact: &Fact, occurred_at: Millis) -> bool {
        match fact {
            Fact::TemplateStatusChanged(t) => self.report(
                &t.template_name,
                &t.language,
                ReportedStatus {
                    status: t.status,
                    at: occurred_at,
                },
            ),
            _ => false,
        }
    }

    fn report(&mut self, name: &str, locale: &str, reported: ReportedStatus) -> bool {
        let key = (name.to_string(), locale.to_string());
        match self.template_status.get(&key) {
            Some(current) if current.rank() >= reported.rank() => false,
            _ => {
                self.template_status.insert(key, reported);
                true
            }
        }
    }

    /// The template statuses as saved positions: one key per template and locale, and a value
    /// that grows with the report's rank, so a store that keeps the highest position of each
    /// key keeps the latest report.
    pub fn saved_positions(&self) -> impl Iterator<Item = (String, i64)> + '_ {
        self.template_status
            .iter()
            .filter(|(_, r)| r.at >= 0)
            .map(|((name, locale), r)| {
                (
                    format!("{TEMPLATE_STATUS_KEY_PREFIX}{name}/{locale}"),
                    r.at * 8 + i64::from(status_code(r.status)),
                )
            })
    }

    /// Takes back a saved position written by `saved_positions`; false for any other key.
    pub fn restore_saved(&mut self, key: &str, value: i64) -> bool {
        let Some((name, locale)) = key
            .strip_prefix(TEMPLATE_STATUS_KEY_PREFIX)
            .and_then(|k| k.rsplit_once('/'))
        else {
            return false;
        };
        let status = STATUSES
            .get(value.rem_euclid(8) as usize)
            .copied()
            .unwrap_or(TemplateStatus::Approved);
        self.report(
            name,
            locale,
            ReportedStatus {
                status,
                at: value.div_euclid(8),
            },
        );
        true
    }

    /// Takes in a stock level; an older measurement never replaces a newer one.
    pub fn observe_stock(&mut self, level: StockLevel) {
        match self.stock.get(&level.sku) {
            Some(current) if current.updated_at > level.updated_at => {}
            _ => {
                self.stock.insert(level.sku.clone(), level);
            }
        }
    }

    /// The stock of a SKU, trusting only a level measured at or after `fresh_since`.
    pub fn stock(&self, sku: &str, fresh_since: Millis) -> Stock {
        match self.stock.get(sku) {
            Some(l) if l.updated_at < fresh_since => Stock::Unknown,
            Some(l) if l.available > 0 => Stock::InStock(l.available),
            Some(_) => Stock::OutOfStock,
            None => Stock::Unknown,
        }
    }

    /// The provider's status for a template, or `catalog` when it has reported none.
    pub fn template_status(
        &self,
        name: &str,
        locale: &str,
        catalog: TemplateStatus,
    ) -> TemplateStatus {
        self.template_status
            .get(&(name.to_string(), locale.to_string()))
            .map_or(catalog, |r| r.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(available: i32, updated_at: Millis) -> StockLevel {
        StockLevel {
            sku: "S".into(),
            available,
            updated_at,
            source_system: "wms".into(),
        }
    }

    #[test]
    fn an_older_level_never_replaces_a_newer_one_and_old_levels_are_not_trusted() {
        let mut t = Tables::default();
        t.observe_stock(level(0, 200));
        t.observe_stock(level(5, 100));
        assert_eq!(t.stock("S", 150), Stock::OutOfStock);
        assert_eq!(t.stock("S", 250), Stock::Unknown);
        assert_eq!(t.stock("other", 0), Stock::Unknown);
        t.observe_stock(level(3, 300));
        assert_eq!(t.stock("S", 250), Stock::InStock(3));
    }

    fn status_changed(status: TemplateStatus) -> Fact {
        Fact::TemplateStatusChanged(crate::events::TemplateStatusChanged {
            template_name: "cart_reminder".into(),
            language: "en_US".into(),
            status,
        })
    }

    #[test]
    fn a_template_status_survives_saving_and_an_earlier_report_never_wins() {
        let mut live = Tables::default();
        assert!(live.observe(&status_changed(TemplateStatus::Paused), 2_000));
        assert!(!live.observe(&status_changed(TemplateStatus::Approved), 1_000));
        let approved = TemplateStatus::Approved;
        assert_eq!(
            live.template_status("cart_reminder", "en_US", approved),
            TemplateStatus::Paused
        );

        // What a restart restores, in any order, even with an older save among them.
        let mut older = Tables::default();
        older.observe(&status_changed(TemplateStatus::Approved), 1_000);
        let mut restored = Tables::default();
        for (k, v) in live.saved_positions().chain(older.saved_positions()) {
            assert!(restored.restore_saved(&k, v));
        }
        assert_eq!(restored, live);
        assert!(!restored.restore_saved("crm.events.v1", 7));

        // The store keeps the highest value per key: that must be the latest report.
        let saved_max = |t: &Tables| t.saved_positions().map(|(_, v)| v).max();
        assert!(saved_max(&live) > saved_max(&older));
    }
}
