//! Word lists for plausible-looking seed and workload data (names, places, products).

pub const FIRST_NAMES: &[&str] = &[
    "Olivia", "Noah", "Amelia", "Oliver", "Isla", "George", "Ava", "Arthur", "Mia", "Leo", "Ivy",
    "Harry", "Freya", "Oscar", "Lily", "Archie", "Florence", "Henry", "Sophia", "Theo", "Grace",
    "Jack", "Emily", "Charlie", "Ella", "Luca", "Sofia", "Mateo", "Ines", "Tomas", "Chiara",
    "Jonas",
];

pub const LAST_NAMES: &[&str] = &[
    "Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Johnson", "Davies", "Patel",
    "Wright", "Robinson", "Wood", "Thompson", "Evans", "Walker", "White", "Roberts", "Green",
    "Hall", "Khan", "Silva", "Rossi", "Muller", "Dubois", "Garcia", "Novak", "Jansen", "Nowak",
    "Costa", "Berg",
];

pub const CITIES: &[&str] = &[
    "London",
    "Manchester",
    "Birmingham",
    "Leeds",
    "Glasgow",
    "Bristol",
    "Liverpool",
    "Edinburgh",
    "Cardiff",
    "Belfast",
    "Nottingham",
    "Sheffield",
    "Leicester",
    "Brighton",
    "Oxford",
    "Cambridge",
    "York",
    "Norwich",
    "Exeter",
    "Aberdeen",
    "Dublin",
    "Lisbon",
    "Porto",
    "Rotterdam",
];

pub const STREETS: &[&str] = &[
    "High Street",
    "Station Road",
    "Church Lane",
    "Main Street",
    "Park Road",
    "Victoria Road",
    "Green Lane",
    "Manor Road",
    "Kings Road",
    "Queens Road",
    "Mill Lane",
    "New Road",
    "School Lane",
];

pub const CATEGORIES: &[&str] = &[
    "apparel",
    "footwear",
    "home",
    "kitchen",
    "garden",
    "toys",
    "electronics",
    "beauty",
    "sports",
    "books",
    "grocery",
    "pets",
];

pub const ADJECTIVES: &[&str] = &[
    "Classic",
    "Premium",
    "Everyday",
    "Compact",
    "Deluxe",
    "Organic",
    "Vintage",
    "Ultra",
    "Eco",
    "Essential",
    "Heritage",
    "Urban",
    "Coastal",
    "Alpine",
    "Studio",
    "Signature",
];

pub const NOUNS: &[&str] = &[
    "Jacket",
    "Sneaker",
    "Lamp",
    "Kettle",
    "Planter",
    "Puzzle",
    "Headphones",
    "Serum",
    "Racket",
    "Notebook",
    "Coffee",
    "Leash",
    "Blanket",
    "Backpack",
    "Mug",
    "Scarf",
    "Speaker",
    "Candle",
];

pub const COLORS: &[&str] = &[
    "black", "white", "navy", "red", "green", "grey", "sand", "olive", "teal", "burgundy",
];

pub const SIZES: &[&str] = &["XS", "S", "M", "L", "XL", "one-size"];

pub const ORIGINS: &[&str] = &["GB", "PT", "IT", "DE", "CN", "VN", "IN", "TR", "PL", "US"];

pub const TAGS: &[&str] = &[
    "new",
    "sale",
    "bestseller",
    "eco",
    "limited",
    "gift",
    "clearance",
    "online-only",
    "bundle",
];

/// Words for product descriptions; mixed with numbers so long descriptions stay large after
/// Postgres compresses them and get stored out of line (TOAST).
pub const DESCRIPTION_WORDS: &[&str] = &[
    "durable",
    "lightweight",
    "designed",
    "for",
    "everyday",
    "use",
    "with",
    "recycled",
    "materials",
    "and",
    "a",
    "soft",
    "finish",
    "that",
    "lasts",
    "machine",
    "washable",
    "tested",
    "in",
    "our",
    "lab",
    "reinforced",
    "stitching",
    "water",
    "resistant",
    "coating",
    "care",
    "instructions",
    "dimensions",
    "warranty",
    "years",
    "fits",
    "true",
    "to",
    "size",
    "responsibly",
    "sourced",
    "packaging",
    "plastic",
    "free",
    "compatible",
    "accessories",
    "sold",
    "separately",
    "batch",
];

pub const PAYMENT_METHODS: &[&str] = &["card", "card", "card", "paypal", "giftcard", "invoice"];

pub const CARRIERS: &[&str] = &["royalmail", "dpd", "dhl", "ups", "evri"];

pub const RETURN_REASONS: &[&str] = &[
    "wrong size",
    "damaged on arrival",
    "not as described",
    "changed mind",
    "arrived late",
];
