//! Any bytes as a job's `recipe` JSON: parsing, validation of every pass's parameters, and the
//! normalized form the service stores (which must parse back to the same recipe).
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelpress::compress::Recipe;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(recipe) = Recipe::parse(&value) {
        let normalized = serde_json::to_value(&recipe).unwrap();
        let again = Recipe::parse(&normalized).expect("a normalized recipe must parse again");
        assert_eq!(serde_json::to_value(&again).unwrap(), normalized);
    }
});
