//! Tables every task reads whole, next to per-customer state: stock per SKU (the compacted
//! inventory topic) and each template's status at the provider. The shell keeps them current;
//! the core only reads them, and records what it relied on in its decisions.

use crate::events::{Fact, Millis, StockLevel, TemplateStatus};
use std::collections::BTreeMap;

/// Stock and template status, as last reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tables {
    /// Latest stock level per SKU.
    pub stock: BTreeMap<String, StockLevel>,
    /// Status reported by the provider per (template name, locale); absent means the catalog's.
    pub template_status: BTreeMap<(String, String), TemplateStatus>,
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
    /// Takes in a template status change; other facts do not touch the tables.
    pub fn observe(&mut self, fact: &Fact) {
        if let Fact::TemplateStatusChanged(t) = fact {
            self.template_status
                .insert((t.template_name.clone(), t.language.clone()), t.status);
        }
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
            .copied()
            .unwrap_or(catalog)
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
}
