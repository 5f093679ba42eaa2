//! The small expression language of `events:` mappings.
//!
//! ```text
//! new.status = 'paid' and old.status <> 'paid'          comparisons: = != <> < <= > >=
//! new.on_hand - old.on_hand                             arithmetic:  + - * / %
//! new.first_name || ' ' || new.last_name                string concatenation
//! coalesce(new.phone, '')   if(new.qty > 0, 'in', 'out')   lower(x)  upper(x)  abs(x)
//! new.id::string   '12.50'::decimal   new.valid_from::date   casts: int long double decimal
//!                                                                   string text bool timestamp date
//! new.reason is null    new.status in ('paid', 'shipped')    not (...)   and   or
//! ```
//!
//! `old.col` is the row before an UPDATE or DELETE, `new.col` the row after an INSERT or UPDATE
//! (in a `lines:` block, `new` is the line row). SQL semantics for null: an operator with a null
//! operand gives null, and a condition that is null counts as false; `coalesce` picks the first
//! non-null. Values keep the column's type (integers, numerics as exact decimals, timestamps),
//! so arithmetic on money stays exact.
//!
//! Expressions are parsed when the config is loaded (errors say the character position) and
//! typed by `walbridge contracts check` against the table's column types; at run time an
//! evaluation error (e.g. an overflow, a failed cast) sends that event to the dead-letter topic.

use std::fmt;

use avro::contract::{Datum, decimal_text, parse_decimal, rescale};

/// A runtime value.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Exact decimal: `unscaled / 10^scale`.
    Dec(i128, u32),
    Str(String),
    /// Microseconds since the Unix epoch, UTC.
    Ts(i64),
    /// Days since 1970-01-01.
    Date(i32),
}

/// A static type, for `contracts check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Null,
    Bool,
    Int,
    Float,
    Dec,
    Str,
    Ts,
    Date,
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ty::Null => "null",
            Ty::Bool => "boolean",
            Ty::Int => "integer",
            Ty::Float => "double",
            Ty::Dec => "decimal",
            Ty::Str => "string",
            Ty::Ts => "timestamp",
            Ty::Date => "date",
        })
    }
}

/// A static type and whether the value may be null.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Typed {
    pub ty: Ty,
    pub nullable: bool,
}

impl Val {
    pub fn ty(&self) -> Ty {
        match self {
            Val::Null => Ty::Null,
            Val::Bool(_) => Ty::Bool,
            Val::Int(_) => Ty::Int,
            Val::Float(_) => Ty::Float,
            Val::Dec(..) => Ty::Dec,
            Val::Str(_) => Ty::Str,
            Val::Ts(_) => Ty::Ts,
            Val::Date(_) => Ty::Date,
        }
    }

    /// The value as text (for `||`, `::string` and event keys).
    pub fn text(&self) -> String {
        match self {
            Val::Null => String::new(),
            Val::Bool(b) => b.to_string(),
            Val::Int(n) => n.to_string(),
            Val::Float(f) => f.to_string(),
            Val::Dec(u, s) => decimal_text(*u, *s),
            Val::Str(s) => s.clone(),
            Val::Ts(us) => format!("{us}"),
            Val::Date(d) => format!("{d}"),
        }
    }

    pub fn into_datum(self) -> Datum {
        match self {
            Val::Null => Datum::Null,
            Val::Bool(b) => Datum::Bool(b),
            Val::Int(n) => Datum::Long(n),
            Val::Float(f) => Datum::Double(f),
            Val::Dec(unscaled, scale) => Datum::Decimal { unscaled, scale },
            Val::Str(s) => Datum::Str(s),
            Val::Ts(us) => Datum::TimestampMicros(us),
            Val::Date(d) => Datum::Date(d),
        }
    }

    fn truthy(&self) -> Result<Option<bool>, String> {
        match self {
            Val::Null => Ok(None),
            Val::Bool(b) => Ok(Some(*b)),
            v => Err(format!("expected a boolean, got {} {}", v.ty(), v.text())),
        }
    }
}

/// Which row a column reference reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Old,
    New,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Old => "old",
            Side::New => "new",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bin {
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Concat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    Coalesce,
    If,
    Lower,
    Upper,
    Abs,
}

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Lit(Val),
    /// `old.name` / `new.name`; `idx` is the column's position once bound to a relation.
    Col {
        side: Side,
        name: String,
        idx: Option<usize>,
    },
    Not(Box<Expr>),
    Neg(Box<Expr>),
    Bin(Bin, Box<Expr>, Box<Expr>),
    Call(Func, Vec<Expr>),
    Cast(Box<Expr>, Ty),
    IsNull(Box<Expr>, bool),
    In(Box<Expr>, Vec<Expr>),
}

/// A syntax error at a character position (0-based) of the expression.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub pos: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at character {}: {}", self.pos + 1, self.message)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(String),
    Str(String),
    Ident(String),
    Op(&'static str),
    End,
}

fn lex(src: &str) -> Result<Vec<(usize, Tok)>, ParseError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            out.push((start, Tok::Num(chars[start..i].iter().collect())));
            continue;
        }
        if c.is_alphabetic() || c == '_' {
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((start, Tok::Ident(chars[start..i].iter().collect())));
            continue;
        }
        if c == '\'' {
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => {
                        return Err(ParseError {
                            pos: start,
                            message:
                                "unterminated string: close it with ' (write '' for a quote inside)"
                                    .into(),
                        });
                    }
                    Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                        s.push('\'');
                        i += 2;
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(ch) => {
                        s.push(*ch);
                        i += 1;
                    }
                }
            }
            out.push((start, Tok::Str(s)));
            continue;
        }
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        let op2 = ["<=", ">=", "<>", "!=", "==", "||", "::"]
            .into_iter()
            .find(|o| *o == two);
        if let Some(o) = op2 {
            out.push((start, Tok::Op(o)));
            i += 2;
            continue;
        }
        let op1 = ["=", "<", ">", "+", "-", "*", "/", "%", "(", ")", ",", "."]
            .into_iter()
            .find(|o| o.starts_with(c));
        match op1 {
            Some(o) => {
                out.push((start, Tok::Op(o)));
                i += 1;
            }
            None => {
                return Err(ParseError {
                    pos: start,
                    message: format!("unexpected character {c:?}"),
                });
            }
        }
    }
    out.push((chars.len(), Tok::End));
    Ok(out)
}

struct Parser {
    toks: Vec<(usize, Tok)>,
    at: usize,
}

/// Parses an expression.
pub fn parse(src: &str) -> Result<Expr, ParseError> {
    let mut p = Parser {
        toks: lex(src)?,
        at: 0,
    };
    let e = p.or()?;
    match p.peek() {
        Tok::End => Ok(e),
        t => Err(p.err(format!(
            "unexpected {} after a complete expression",
            describe(t)
        ))),
    }
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Num(n) => format!("number {n}"),
        Tok::Str(s) => format!("string '{s}'"),
        Tok::Ident(i) => format!("`{i}`"),
        Tok::Op(o) => format!("`{o}`"),
        Tok::End => "the end of the expression".into(),
    }
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.toks[self.at].1
    }
    fn pos(&self) -> usize {
        self.toks[self.at].0
    }
    fn next(&mut self) -> Tok {
        let t = self.toks[self.at].1.clone();
        if self.at + 1 < self.toks.len() {
            self.at += 1;
        }
        t
    }
    fn err(&self, message: String) -> ParseError {
        ParseError {
            pos: self.pos(),
            message,
        }
    }
    fn eat_op(&mut self, op: &str) -> bool {
        if *self.peek()
            == Tok::Op(match op {
                "(" => "(",
                ")" => ")",
                "," => ",",
                "." => ".",
                "::" => "::",
                _ => return false,
            })
        {
            self.next();
            true
        } else {
            false
        }
    }
    fn eat_kw(&mut self, kw: &str) -> bool {
        if matches!(self.peek(), Tok::Ident(i) if i.eq_ignore_ascii_case(kw)) {
            self.next();
            true
        } else {
            false
        }
    }
    fn expect(&mut self, op: &str) -> Result<(), ParseError> {
        if self.eat_op(op) {
            Ok(())
        } else {
            Err(self.err(format!("expected `{op}`, found {}", describe(self.peek()))))
        }
    }

    fn or(&mut self) -> Result<Expr, ParseError> {
        let mut l = self.and()?;
        while self.eat_kw("or") {
            l = Expr::Bin(Bin::Or, Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }
    fn and(&mut self) -> Result<Expr, ParseError> {
        let mut l = self.not()?;
        while self.eat_kw("and") {
            l = Expr::Bin(Bin::And, Box::new(l), Box::new(self.not()?));
        }
        Ok(l)
    }
    fn not(&mut self) -> Result<Expr, ParseError> {
        if self.eat_kw("not") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.cmp()
    }
    fn cmp(&mut self) -> Result<Expr, ParseError> {
        let l = self.add()?;
        if self.eat_kw("is") {
            let negated = self.eat_kw("not");
            if !self.eat_kw("null") {
                return Err(self.err("expected `null` after `is`/`is not`".into()));
            }
            return Ok(Expr::IsNull(Box::new(l), negated));
        }
        if self.eat_kw("in") {
            self.expect("(")?;
            let mut items = vec![self.or()?];
            while self.eat_op(",") {
                items.push(self.or()?);
            }
            self.expect(")")?;
            return Ok(Expr::In(Box::new(l), items));
        }
        let op = match self.peek() {
            Tok::Op("=" | "==") => Bin::Eq,
            Tok::Op("!=" | "<>") => Bin::Ne,
            Tok::Op("<") => Bin::Lt,
            Tok::Op("<=") => Bin::Le,
            Tok::Op(">") => Bin::Gt,
            Tok::Op(">=") => Bin::Ge,
            _ => return Ok(l),
        };
        self.next();
        Ok(Expr::Bin(op, Box::new(l), Box::new(self.add()?)))
    }
    fn add(&mut self) -> Result<Expr, ParseError> {
        let mut l = self.mul()?;
        loop {
            let op = match self.peek() {
                Tok::Op("+") => Bin::Add,
                Tok::Op("-") => Bin::Sub,
                Tok::Op("||") => Bin::Concat,
                _ => return Ok(l),
            };
            self.next();
            l = Expr::Bin(op, Box::new(l), Box::new(self.mul()?));
        }
    }
    fn mul(&mut self) -> Result<Expr, ParseError> {
        let mut l = self.unary()?;
        loop {
            let op = match self.peek() {
                Tok::Op("*") => Bin::Mul,
                Tok::Op("/") => Bin::Div,
                Tok::Op("%") => Bin::Rem,
                _ => return Ok(l),
            };
            self.next();
            l = Expr::Bin(op, Box::new(l), Box::new(self.unary()?));
        }
    }
    fn unary(&mut self) -> Result<Expr, ParseError> {
        if *self.peek() == Tok::Op("-") {
            self.next();
            return Ok(Expr::Neg(Box::new(self.unary()?)));
        }
        let mut e = self.primary()?;
        while self.eat_op("::") {
            let at = self.pos();
            let Tok::Ident(name) = self.next() else {
                return Err(ParseError {
                    pos: at,
                    message: "expected a type name after `::`".into(),
                });
            };
            let ty = match name.to_ascii_lowercase().as_str() {
                "int" | "long" | "bigint" | "integer" => Ty::Int,
                "double" | "float" => Ty::Float,
                "decimal" | "numeric" => Ty::Dec,
                "string" | "text" => Ty::Str,
                "bool" | "boolean" => Ty::Bool,
                "timestamp" | "timestamptz" => Ty::Ts,
                "date" => Ty::Date,
                _ => {
                    return Err(ParseError {
                        pos: at,
                        message: format!(
                            "unknown type `{name}`; use int, long, double, decimal, string, bool, timestamp or date"
                        ),
                    });
                }
            };
            e = Expr::Cast(Box::new(e), ty);
        }
        Ok(e)
    }
    fn primary(&mut self) -> Result<Expr, ParseError> {
        let at = self.pos();
        match self.next() {
            Tok::Num(n) => {
                if let Ok(i) = n.parse::<i64>() {
                    return Ok(Expr::Lit(Val::Int(i)));
                }
                match parse_decimal(&n) {
                    Some(Datum::Decimal { unscaled, scale }) => {
                        Ok(Expr::Lit(Val::Dec(unscaled, scale)))
                    }
                    _ => Err(ParseError {
                        pos: at,
                        message: format!("`{n}` is not a number"),
                    }),
                }
            }
            Tok::Str(s) => Ok(Expr::Lit(Val::Str(s))),
            Tok::Op("(") => {
                let e = self.or()?;
                self.expect(")")?;
                Ok(e)
            }
            Tok::Ident(id) => {
                let lower = id.to_ascii_lowercase();
                match lower.as_str() {
                    "true" => return Ok(Expr::Lit(Val::Bool(true))),
                    "false" => return Ok(Expr::Lit(Val::Bool(false))),
                    "null" => return Ok(Expr::Lit(Val::Null)),
                    _ => {}
                }
                if self.eat_op(".") {
                    let side = match lower.as_str() {
                        "old" => Side::Old,
                        "new" => Side::New,
                        _ => {
                            return Err(ParseError {
                                pos: at,
                                message: format!(
                                    "unknown row `{id}`; columns are read as old.<column> or new.<column>"
                                ),
                            });
                        }
                    };
                    let col_at = self.pos();
                    let Tok::Ident(name) = self.next() else {
                        return Err(ParseError {
                            pos: col_at,
                            message: format!("expected a column name after `{id}.`"),
                        });
                    };
                    return Ok(Expr::Col {
                        side,
                        name,
                        idx: None,
                    });
                }
                if *self.peek() == Tok::Op("(") {
                    let (f, arity): (Func, std::ops::RangeInclusive<usize>) = match lower.as_str() {
                        "coalesce" => (Func::Coalesce, 1..=usize::MAX),
                        "if" => (Func::If, 3..=3),
                        "lower" => (Func::Lower, 1..=1),
                        "upper" => (Func::Upper, 1..=1),
                        "abs" => (Func::Abs, 1..=1),
                        _ => {
                            return Err(ParseError {
                                pos: at,
                                message: format!(
                                    "unknown function `{id}`; available: coalesce, if, lower, upper, abs"
                                ),
                            });
                        }
                    };
                    self.next();
                    let mut args = Vec::new();
                    if !self.eat_op(")") {
                        args.push(self.or()?);
                        while self.eat_op(",") {
                            args.push(self.or()?);
                        }
                        self.expect(")")?;
                    }
                    if !arity.contains(&args.len()) {
                        return Err(ParseError {
                            pos: at,
                            message: format!(
                                "{lower}() takes {} argument(s), got {}",
                                if *arity.end() == usize::MAX {
                                    format!("at least {}", arity.start())
                                } else {
                                    arity.start().to_string()
                                },
                                args.len()
                            ),
                        });
                    }
                    return Ok(Expr::Call(f, args));
                }
                Err(ParseError {
                    pos: at,
                    message: format!(
                        "bare name `{id}`: write old.{id} or new.{id} for a column, or quote a string as '{id}'"
                    ),
                })
            }
            t => Err(ParseError {
                pos: at,
                message: format!("expected a value, found {}", describe(&t)),
            }),
        }
    }
}

/// Rows an expression reads: `old` and `new`, each a column list in relation order.
pub struct Rows<'a> {
    pub old: Option<&'a [Val]>,
    pub new: Option<&'a [Val]>,
}

impl Expr {
    /// Every column reference, in order.
    pub fn columns(&self, out: &mut Vec<(Side, String)>) {
        match self {
            Expr::Lit(_) => {}
            Expr::Col { side, name, .. } => out.push((*side, name.clone())),
            Expr::Not(e) | Expr::Neg(e) | Expr::Cast(e, _) | Expr::IsNull(e, _) => e.columns(out),
            Expr::Bin(_, l, r) => {
                l.columns(out);
                r.columns(out);
            }
            Expr::Call(_, args) => args.iter().for_each(|a| a.columns(out)),
            Expr::In(e, items) => {
                e.columns(out);
                items.iter().for_each(|a| a.columns(out));
            }
        }
    }

    /// Resolves column names to positions in `names` (a relation's columns).
    pub fn bind(&mut self, names: &[&str]) -> Result<(), String> {
        match self {
            Expr::Lit(_) => Ok(()),
            Expr::Col { name, idx, side } => {
                *idx = Some(names.iter().position(|n| n == name).ok_or_else(|| {
                    format!(
                        "{side}.{name}: the table has no column {name:?} (columns: {})",
                        names.join(", ")
                    )
                })?);
                Ok(())
            }
            Expr::Not(e) | Expr::Neg(e) | Expr::Cast(e, _) | Expr::IsNull(e, _) => e.bind(names),
            Expr::Bin(_, l, r) => {
                l.bind(names)?;
                r.bind(names)
            }
            Expr::Call(_, args) => args.iter_mut().try_for_each(|a| a.bind(names)),
            Expr::In(e, items) => {
                e.bind(names)?;
                items.iter_mut().try_for_each(|a| a.bind(names))
            }
        }
    }

    /// Evaluates against bound rows. A missing row (`old` on an INSERT) reads as nulls.
    pub fn eval(&self, rows: &Rows<'_>) -> Result<Val, String> {
        Ok(match self {
            Expr::Lit(v) => v.clone(),
            Expr::Col { side, idx, name } => {
                let row = match side {
                    Side::Old => rows.old,
                    Side::New => rows.new,
                };
                let i = idx.ok_or_else(|| format!("{side}.{name} is not bound to a table"))?;
                row.and_then(|r| r.get(i)).cloned().unwrap_or(Val::Null)
            }
            Expr::Not(e) => match e.eval(rows)?.truthy()? {
                None => Val::Null,
                Some(b) => Val::Bool(!b),
            },
            Expr::Neg(e) => match e.eval(rows)? {
                Val::Null => Val::Null,
                Val::Int(n) => Val::Int(n.checked_neg().ok_or("integer overflow in -")?),
                Val::Float(f) => Val::Float(-f),
                Val::Dec(u, s) => Val::Dec(-u, s),
                v => return Err(format!("cannot negate {} {}", v.ty(), v.text())),
            },
            Expr::Bin(Bin::And, l, r) => match (l.eval(rows)?.truthy()?, r.eval(rows)?.truthy()?) {
                (Some(false), _) | (_, Some(false)) => Val::Bool(false),
                (Some(true), Some(true)) => Val::Bool(true),
                _ => Val::Null,
            },
            Expr::Bin(Bin::Or, l, r) => match (l.eval(rows)?.truthy()?, r.eval(rows)?.truthy()?) {
                (Some(true), _) | (_, Some(true)) => Val::Bool(true),
                (Some(false), Some(false)) => Val::Bool(false),
                _ => Val::Null,
            },
            Expr::Bin(op, l, r) => binary(*op, l.eval(rows)?, r.eval(rows)?)?,
            Expr::Call(f, args) => match f {
                Func::Coalesce => {
                    for a in args {
                        let v = a.eval(rows)?;
                        if v != Val::Null {
                            return Ok(v);
                        }
                    }
                    Val::Null
                }
                Func::If => {
                    if args[0].eval(rows)?.truthy()? == Some(true) {
                        args[1].eval(rows)?
                    } else {
                        args[2].eval(rows)?
                    }
                }
                Func::Lower | Func::Upper => match args[0].eval(rows)? {
                    Val::Null => Val::Null,
                    Val::Str(s) if *f == Func::Lower => Val::Str(s.to_lowercase()),
                    Val::Str(s) => Val::Str(s.to_uppercase()),
                    v => return Err(format!("lower/upper take a string, got {}", v.ty())),
                },
                Func::Abs => match args[0].eval(rows)? {
                    Val::Null => Val::Null,
                    Val::Int(n) => Val::Int(n.checked_abs().ok_or("integer overflow in abs")?),
                    Val::Float(f) => Val::Float(f.abs()),
                    Val::Dec(u, s) => Val::Dec(u.abs(), s),
                    v => return Err(format!("abs takes a number, got {}", v.ty())),
                },
            },
            Expr::Cast(e, ty) => cast(e.eval(rows)?, *ty)?,
            Expr::IsNull(e, negated) => Val::Bool((e.eval(rows)? == Val::Null) != *negated),
            Expr::In(e, items) => {
                let v = e.eval(rows)?;
                if v == Val::Null {
                    return Ok(Val::Null);
                }
                for it in items {
                    if binary(Bin::Eq, v.clone(), it.eval(rows)?)? == Val::Bool(true) {
                        return Ok(Val::Bool(true));
                    }
                }
                Val::Bool(false)
            }
        })
    }

    /// The static type, with `col` giving each column's type.
    pub fn infer(
        &self,
        col: &dyn Fn(Side, &str) -> Result<Typed, String>,
    ) -> Result<Typed, String> {
        let t = |ty, nullable| Typed { ty, nullable };
        Ok(match self {
            Expr::Lit(v) => t(v.ty(), *v == Val::Null),
            Expr::Col { side, name, .. } => col(*side, name)?,
            Expr::Not(e) => {
                let a = e.infer(col)?;
                expect_bool(a)?;
                t(Ty::Bool, a.nullable)
            }
            Expr::Neg(e) => {
                let a = e.infer(col)?;
                if !matches!(a.ty, Ty::Int | Ty::Float | Ty::Dec | Ty::Null) {
                    return Err(format!("cannot negate a {}", a.ty));
                }
                a
            }
            Expr::Bin(op, l, r) => {
                let (a, b) = (l.infer(col)?, r.infer(col)?);
                let nullable = a.nullable || b.nullable;
                match op {
                    Bin::And | Bin::Or => {
                        expect_bool(a)?;
                        expect_bool(b)?;
                        t(Ty::Bool, nullable)
                    }
                    Bin::Eq | Bin::Ne | Bin::Lt | Bin::Le | Bin::Gt | Bin::Ge => {
                        if !comparable(a.ty, b.ty) {
                            return Err(format!("cannot compare a {} with a {}", a.ty, b.ty));
                        }
                        t(Ty::Bool, nullable)
                    }
                    Bin::Concat => t(Ty::Str, nullable),
                    _ => t(numeric_result(*op, a.ty, b.ty)?, nullable),
                }
            }
            Expr::Call(f, args) => {
                let ts: Vec<Typed> = args
                    .iter()
                    .map(|a| a.infer(col))
                    .collect::<Result<_, _>>()?;
                match f {
                    Func::Coalesce => {
                        let ty = ts
                            .iter()
                            .map(|x| x.ty)
                            .find(|x| *x != Ty::Null)
                            .unwrap_or(Ty::Null);
                        if let Some(o) = ts
                            .iter()
                            .find(|x| x.ty != Ty::Null && !comparable(x.ty, ty))
                        {
                            return Err(format!("coalesce mixes {ty} and {}", o.ty));
                        }
                        t(ty, ts.iter().all(|x| x.nullable))
                    }
                    Func::If => {
                        expect_bool(ts[0])?;
                        let ty = if ts[1].ty == Ty::Null {
                            ts[2].ty
                        } else {
                            ts[1].ty
                        };
                        if ts[2].ty != Ty::Null && !comparable(ts[2].ty, ty) {
                            return Err(format!("if() branches differ: {ty} and {}", ts[2].ty));
                        }
                        t(ty, ts[1].nullable || ts[2].nullable)
                    }
                    Func::Lower | Func::Upper => {
                        if !matches!(ts[0].ty, Ty::Str | Ty::Null) {
                            return Err(format!("lower/upper take a string, got a {}", ts[0].ty));
                        }
                        t(Ty::Str, ts[0].nullable)
                    }
                    Func::Abs => {
                        if !matches!(ts[0].ty, Ty::Int | Ty::Float | Ty::Dec | Ty::Null) {
                            return Err(format!("abs takes a number, got a {}", ts[0].ty));
                        }
                        ts[0]
                    }
                }
            }
            Expr::Cast(e, ty) => t(*ty, e.infer(col)?.nullable),
            Expr::IsNull(e, _) => {
                e.infer(col)?;
                t(Ty::Bool, false)
            }
            Expr::In(e, items) => {
                let a = e.infer(col)?;
                for it in items {
                    let b = it.infer(col)?;
                    if !comparable(a.ty, b.ty) {
                        return Err(format!("`in` compares a {} with a {}", a.ty, b.ty));
                    }
                }
                t(Ty::Bool, a.nullable)
            }
        })
    }
}

fn expect_bool(a: Typed) -> Result<(), String> {
    match a.ty {
        Ty::Bool | Ty::Null => Ok(()),
        other => Err(format!("expected a boolean, got a {other}")),
    }
}

fn is_num(t: Ty) -> bool {
    matches!(t, Ty::Int | Ty::Float | Ty::Dec)
}

fn comparable(a: Ty, b: Ty) -> bool {
    a == b || a == Ty::Null || b == Ty::Null || (is_num(a) && is_num(b))
}

fn numeric_result(op: Bin, a: Ty, b: Ty) -> Result<Ty, String> {
    if !(is_num(a) || a == Ty::Null) || !(is_num(b) || b == Ty::Null) {
        return Err(format!("arithmetic needs numbers, got a {a} and a {b}"));
    }
    Ok(match (a, b) {
        (Ty::Float, _) | (_, Ty::Float) => Ty::Float,
        (Ty::Dec, _) | (_, Ty::Dec) if op == Bin::Div => Ty::Float,
        (Ty::Dec, _) | (_, Ty::Dec) => Ty::Dec,
        _ => Ty::Int,
    })
}

fn as_dec(v: &Val) -> Option<(i128, u32)> {
    match v {
        Val::Int(n) => Some((i128::from(*n), 0)),
        Val::Dec(u, s) => Some((*u, *s)),
        _ => None,
    }
}

fn as_f64(v: &Val) -> Option<f64> {
    match v {
        Val::Int(n) => Some(*n as f64),
        Val::Float(f) => Some(*f),
        Val::Dec(u, s) => Some(*u as f64 / 10f64.powi(*s as i32)),
        _ => None,
    }
}

fn binary(op: Bin, a: Val, b: Val) -> Result<Val, String> {
    if a == Val::Null || b == Val::Null {
        return Ok(Val::Null);
    }
    if op == Bin::Concat {
        return Ok(Val::Str(a.text() + &b.text()));
    }
    let overflow = || format!("numeric overflow in {} {op:?} {}", a.text(), b.text());
    if matches!(
        op,
        Bin::Eq | Bin::Ne | Bin::Lt | Bin::Le | Bin::Gt | Bin::Ge
    ) {
        let ord = match (&a, &b) {
            (Val::Int(x), Val::Int(y)) => x.cmp(y),
            (Val::Str(x), Val::Str(y)) => x.cmp(y),
            (Val::Bool(x), Val::Bool(y)) => x.cmp(y),
            (Val::Ts(x), Val::Ts(y)) => x.cmp(y),
            (Val::Date(x), Val::Date(y)) => x.cmp(y),
            (Val::Float(_), _) | (_, Val::Float(_)) if is_num(a.ty()) && is_num(b.ty()) => {
                as_f64(&a)
                    .zip(as_f64(&b))
                    .and_then(|(x, y)| x.partial_cmp(&y))
                    .ok_or("NaN cannot be compared")?
            }
            _ if is_num(a.ty()) && is_num(b.ty()) => {
                let ((x, xs), (y, ys)) = (
                    as_dec(&a).ok_or_else(overflow)?,
                    as_dec(&b).ok_or_else(overflow)?,
                );
                let s = xs.max(ys);
                let x = rescale(x, xs, s).ok_or_else(overflow)?;
                let y = rescale(y, ys, s).ok_or_else(overflow)?;
                x.cmp(&y)
            }
            _ => return Err(format!("cannot compare {} with {}", a.ty(), b.ty())),
        };
        use std::cmp::Ordering::*;
        return Ok(Val::Bool(match op {
            Bin::Eq => ord == Equal,
            Bin::Ne => ord != Equal,
            Bin::Lt => ord == Less,
            Bin::Le => ord != Greater,
            Bin::Gt => ord == Greater,
            _ => ord != Less,
        }));
    }
    numeric_result(op, a.ty(), b.ty())?;
    match (&a, &b) {
        (Val::Int(x), Val::Int(y)) => {
            let r = match op {
                Bin::Add => x.checked_add(*y),
                Bin::Sub => x.checked_sub(*y),
                Bin::Mul => x.checked_mul(*y),
                Bin::Div if *y == 0 => return Err("division by zero".into()),
                Bin::Div => x.checked_div(*y),
                Bin::Rem if *y == 0 => return Err("division by zero".into()),
                _ => x.checked_rem(*y),
            };
            Ok(Val::Int(r.ok_or_else(overflow)?))
        }
        (Val::Float(_), _) | (_, Val::Float(_)) => {
            let (x, y) = (
                as_f64(&a).ok_or_else(overflow)?,
                as_f64(&b).ok_or_else(overflow)?,
            );
            Ok(Val::Float(match op {
                Bin::Add => x + y,
                Bin::Sub => x - y,
                Bin::Mul => x * y,
                Bin::Div => x / y,
                _ => x % y,
            }))
        }
        _ if op == Bin::Div => {
            let (x, y) = (
                as_f64(&a).ok_or_else(overflow)?,
                as_f64(&b).ok_or_else(overflow)?,
            );
            Ok(Val::Float(x / y))
        }
        _ => {
            let ((x, xs), (y, ys)) = (
                as_dec(&a).ok_or_else(overflow)?,
                as_dec(&b).ok_or_else(overflow)?,
            );
            if op == Bin::Mul {
                return Ok(Val::Dec(x.checked_mul(y).ok_or_else(overflow)?, xs + ys));
            }
            let s = xs.max(ys);
            let x = rescale(x, xs, s).ok_or_else(overflow)?;
            let y = rescale(y, ys, s).ok_or_else(overflow)?;
            let r = match op {
                Bin::Add => x.checked_add(y),
                Bin::Sub => x.checked_sub(y),
                _ if y == 0 => return Err("division by zero".into()),
                _ => x.checked_rem(y),
            };
            Ok(Val::Dec(r.ok_or_else(overflow)?, s))
        }
    }
}

fn cast(v: Val, ty: Ty) -> Result<Val, String> {
    let fail = |v: &Val| format!("cannot cast {} {:?} to {ty}", v.ty(), v.text());
    Ok(match (ty, v) {
        (_, Val::Null) => Val::Null,
        (Ty::Str, v) => Val::Str(v.text()),
        (Ty::Int, Val::Int(n)) => Val::Int(n),
        (Ty::Int, v @ Val::Dec(..)) => {
            let (u, s) = as_dec(&v).ok_or_else(|| fail(&v))?;
            Val::Int(
                rescale(u, s, 0)
                    .and_then(|n| i64::try_from(n).ok())
                    .ok_or_else(|| fail(&v))?,
            )
        }
        (Ty::Int, Val::Float(f)) if f.fract() == 0.0 && f.abs() < 9.2e18 => Val::Int(f as i64),
        (Ty::Int, Val::Str(s)) => {
            Val::Int(s.trim().parse().map_err(|_| fail(&Val::Str(s.clone())))?)
        }
        (Ty::Float, v) => Val::Float(match &v {
            Val::Str(s) => s.trim().parse().map_err(|_| fail(&v))?,
            _ => as_f64(&v).ok_or_else(|| fail(&v))?,
        }),
        (Ty::Dec, Val::Int(n)) => Val::Dec(i128::from(n), 0),
        (Ty::Dec, v @ Val::Dec(..)) => v,
        (Ty::Dec, Val::Str(s)) => match parse_decimal(s.trim()) {
            Some(Datum::Decimal { unscaled, scale }) => Val::Dec(unscaled, scale),
            _ => return Err(fail(&Val::Str(s))),
        },
        (Ty::Bool, Val::Bool(b)) => Val::Bool(b),
        (Ty::Bool, Val::Str(s)) => match s.as_str() {
            "t" | "true" => Val::Bool(true),
            "f" | "false" => Val::Bool(false),
            _ => return Err(fail(&Val::Str(s))),
        },
        (Ty::Ts, v @ Val::Ts(_)) => v,
        (Ty::Ts, Val::Date(d)) => Val::Ts(i64::from(d) * 86_400_000_000),
        (Ty::Ts, Val::Str(s)) => Val::Ts(
            avro::contract::pg_timestamp_micros(s.as_bytes(), true)
                .or_else(|| avro::contract::pg_timestamp_micros(s.as_bytes(), false))
                .ok_or_else(|| fail(&Val::Str(s.clone())))?,
        ),
        (Ty::Date, v @ Val::Date(_)) => v,
        (Ty::Date, Val::Ts(us)) => Val::Date(us.div_euclid(86_400_000_000) as i32),
        (Ty::Date, Val::Str(s)) => Val::Date(
            avro::contract::pg_date_days(s.as_bytes()).ok_or_else(|| fail(&Val::Str(s.clone())))?,
        ),
        (_, v) => return Err(fail(&v)),
    })
}

/// The value of a column as pgoutput sent it (text format), typed by the column's type OID.
/// Text that does not parse as its type stays a string (evaluation then says why it fails).
pub fn from_pg_text(oid: u32, text: &str) -> Val {
    let parsed = match oid {
        16 => match text {
            "t" => Some(Val::Bool(true)),
            "f" => Some(Val::Bool(false)),
            _ => None,
        },
        20 | 21 | 23 => text.parse().ok().map(Val::Int),
        700 | 701 => text.parse().ok().map(Val::Float),
        1700 => match parse_decimal(text) {
            Some(Datum::Decimal { unscaled, scale }) => Some(Val::Dec(unscaled, scale)),
            _ => None,
        },
        1114 => avro::contract::pg_timestamp_micros(text.as_bytes(), false).map(Val::Ts),
        1184 => avro::contract::pg_timestamp_micros(text.as_bytes(), true).map(Val::Ts),
        1082 => avro::contract::pg_date_days(text.as_bytes()).map(Val::Date),
        _ => return Val::Str(text.to_owned()),
    };
    parsed.unwrap_or_else(|| Val::Str(text.to_owned()))
}

/// The static type of a column from its Postgres type name (`pg_type.typname`).
pub fn ty_of_pg(typname: &str) -> Ty {
    match typname {
        "bool" => Ty::Bool,
        "int2" | "int4" | "int8" => Ty::Int,
        "float4" | "float8" => Ty::Float,
        "numeric" => Ty::Dec,
        "timestamp" | "timestamptz" => Ty::Ts,
        "date" => Ty::Date,
        _ => Ty::Str,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(src: &str, old: &[Val], new: &[Val]) -> Result<Val, String> {
        let mut e = parse(src).map_err(|e| e.to_string())?;
        e.bind(&["id", "status", "qty", "price"])?;
        e.eval(&Rows {
            old: Some(old),
            new: Some(new),
        })
    }

    #[test]
    fn transitions_arithmetic_and_nulls() {
        let old = [
            Val::Int(1),
            Val::Str("pending".into()),
            Val::Int(10),
            Val::Dec(1250, 2),
        ];
        let new = [Val::Int(1), Val::Str("paid".into()), Val::Int(7), Val::Null];
        let t = |s: &str| eval(s, &old, &new).unwrap();
        assert_eq!(
            t("old.status = 'pending' and new.status = 'paid'"),
            Val::Bool(true)
        );
        assert_eq!(
            t("new.status in ('shipped', 'paid') and not old.status <> 'pending'"),
            Val::Bool(true)
        );
        assert_eq!(t("new.qty - old.qty"), Val::Int(-3));
        assert_eq!(t("old.price * 2 + 0.5"), Val::Dec(2550, 2));
        assert_eq!(t("new.price > 1"), Val::Null);
        assert_eq!(t("coalesce(new.price, old.price, 0)"), Val::Dec(1250, 2));
        assert_eq!(
            t("new.id::string || '@' || upper(new.status)"),
            Val::Str("1@PAID".into())
        );
        assert_eq!(
            t("if(new.qty < old.qty, 'pick', 'receipt')"),
            Val::Str("pick".into())
        );
        assert_eq!(t("'12.50'::decimal = 12.5"), Val::Bool(true));
        assert_eq!(
            t("new.price is null and old.price is not null"),
            Val::Bool(true)
        );
        assert!(
            eval("new.status + 1", &old, &new)
                .unwrap_err()
                .contains("numbers")
        );
        assert!(
            eval("9223372036854775807 + new.id", &old, &new)
                .unwrap_err()
                .contains("overflow")
        );
    }

    #[test]
    fn parse_errors_say_where_and_what() {
        let e = parse("new.status = 'paid' and").unwrap_err();
        assert_eq!(
            e.to_string(),
            "at character 24: expected a value, found the end of the expression"
        );
        let e = parse("new.qty * (old.qty").unwrap_err();
        assert_eq!(e.pos, 18, "{e}");
        let e = parse("status = 'x'").unwrap_err();
        assert!(e.message.contains("write old.status or new.status"), "{e}");
        let e = parse("new.x::money").unwrap_err();
        assert_eq!(e.pos, 7);
        let e = parse("'open").unwrap_err();
        assert!(e.message.contains("unterminated"), "{e}");
        let e = parse("nope(1)").unwrap_err();
        assert!(e.message.contains("unknown function"), "{e}");
    }

    #[test]
    fn types_are_inferred_from_columns() {
        let col = |_: Side, name: &str| -> Result<Typed, String> {
            Ok(match name {
                "qty" => Typed {
                    ty: Ty::Int,
                    nullable: false,
                },
                "price" => Typed {
                    ty: Ty::Dec,
                    nullable: true,
                },
                _ => Typed {
                    ty: Ty::Str,
                    nullable: false,
                },
            })
        };
        let ty = |s: &str| parse(s).unwrap().infer(&col);
        assert_eq!(
            ty("new.qty - old.qty").unwrap(),
            Typed {
                ty: Ty::Int,
                nullable: false
            }
        );
        assert_eq!(
            ty("new.price * new.qty").unwrap(),
            Typed {
                ty: Ty::Dec,
                nullable: true
            }
        );
        assert!(!ty("coalesce(new.price, 0)").unwrap().nullable);
        assert!(ty("new.status > 3").unwrap_err().contains("compare"));
    }
}
