//! The text of a message that travels as text (SMS, e-mail, a WhatsApp session message),
//! composed from the catalog's body with the approved values.

use crate::events::*;
use crate::topology::TemplateCatalog;

/// Whether a message travels as composed text rather than as a template the provider holds:
/// every SMS and e-mail, and a WhatsApp session message.
pub fn carries_text(m: &MessageApproved) -> bool {
    m.channel != Channel::Whatsapp || m.delivery == Delivery::Session
}

/// Why a message cannot be composed as text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CompositionError(pub String);

/// The text of a message on a channel that carries text rather than a template the provider
/// holds (SMS, e-mail, a WhatsApp session message): the catalog body of the approved variant
/// with its variables filled in. A placeholder without a value is an error, never a blank.
pub fn compose(catalog: &TemplateCatalog, m: &MessageApproved) -> Result<String, CompositionError> {
    let variants = catalog.variants(&m.template_name).ok_or_else(|| {
        CompositionError(format!(
            "template {} is not in the catalog",
            m.template_name
        ))
    })?;
    let template = variants
        .iter()
        .find(|t| t.locale == m.locale && t.version == m.template_version)
        .or_else(|| {
            // A catalog updated since the approval: the newest version in the same locale.
            variants
                .iter()
                .filter(|t| t.locale == m.locale)
                .max_by_key(|t| t.version)
        })
        .ok_or_else(|| {
            CompositionError(format!(
                "template {} has no {} variant in the catalog",
                m.template_name, m.locale
            ))
        })?;
    let mut out = String::with_capacity(template.body.len() + 32);
    let mut rest = template.body.as_str();
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or_else(|| {
            CompositionError(format!(
                "template {} ({}) has an unclosed '{{{{'",
                m.template_name, m.locale
            ))
        })?;
        let name = after[..close].trim();
        let value = m.variables.get(name).ok_or_else(|| {
            CompositionError(format!(
                "template {} ({}) needs {name}, which the approval does not carry",
                m.template_name, m.locale
            ))
        })?;
        out.push_str(value);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The subject line of an e-mail: the first sentence of its text, cut at a word boundary so
/// it fits the 78 characters a mail header line should keep to.
pub fn subject_of(text: &str) -> String {
    let first = text
        .split_inclusive(['.', '!', '?', '\n'])
        .next()
        .unwrap_or(text)
        .trim();
    if first.chars().count() <= 78 {
        return first.to_string();
    }
    let mut cut = String::new();
    for word in first.split_whitespace() {
        if cut.chars().count() + word.chars().count() + 1 > 77 {
            break;
        }
        if !cut.is_empty() {
            cut.push(' ');
        }
        cut.push_str(word);
    }
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::intent::tests::approval;

    fn catalog() -> TemplateCatalog {
        crate::topology::Topology::embedded()
            .expect("embedded topology")
            .catalog
    }

    #[test]
    fn a_text_channel_gets_the_catalog_body_with_the_approved_values() {
        let (_, mut m) = approval();
        m.template_version = 3;
        m.variables = crate::sorted_map::SortedMap::from([
            ("first_name".to_string(), "Ana".to_string()),
            ("order_id".to_string(), "A-17".to_string()),
            ("total".to_string(), "EUR 12.50".to_string()),
        ]);
        let text = compose(&catalog(), &m).expect("composed");
        assert_eq!(
            text,
            "Hi Ana, thanks for your order A-17. Total: EUR 12.50."
        );
        assert_eq!(subject_of(&text), "Hi Ana, thanks for your order A-17.");
        m.variables.remove("total");
        let e = compose(&catalog(), &m).expect_err("a missing value is never sent blank");
        assert!(e.0.contains("total"), "{e}");
        m.template_name = "no_such_template".into();
        assert!(compose(&catalog(), &m).is_err());
    }

    #[test]
    fn a_long_first_sentence_is_cut_at_a_word_for_the_subject() {
        let long = "word ".repeat(40);
        let subject = subject_of(&long);
        assert!(subject.chars().count() <= 78, "{subject}");
        assert!(subject.ends_with("word…"), "{subject}");
    }
}
