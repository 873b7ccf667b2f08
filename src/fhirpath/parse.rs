//! The FHIRPath subset SQL on FHIR views use, parsed into an [`Expr`] tree.
//!
//! Precedence follows the FHIRPath grammar (lowest first): `implies`, `or`/`xor`, `and`,
//! `in`/`contains`, `=`/`!=`, `<`/`>`/`<=`/`>=`, `|`, `+`/`-`/`&`, `*`/`/`/`div`/`mod`,
//! unary minus, then invocations (`.name`, `.fn(args)`, `[index]`). Identifiers are plain
//! (`[A-Za-z_][A-Za-z0-9_]*`) or backquoted with the same characters: they become JSON keys
//! in SQL, so nothing else may reach it.

/// A parsed expression. A leading name or function applies to [`Expr::This`].
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// The focus: `$this`, or the implicit start of a path.
    This,
    /// `%name` (a view constant, or `%rowIndex`).
    Var(String),
    Str(String),
    /// A number as written (its digits are kept).
    Num(String),
    Bool(bool),
    /// `@2020-01-01`, `@T10:00`, as written without the `@`.
    DateTime(String),
    /// `{}`.
    Empty,
    Member(Box<Expr>, String),
    Call(Box<Expr>, String, Vec<Expr>),
    Index(Box<Expr>, Box<Expr>),
    Binary(Op, Box<Expr>, Box<Expr>),
    Neg(Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Implies,
    Or,
    Xor,
    And,
    In,
    Contains,
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
    Union,
    Add,
    Sub,
    Concat,
    Mul,
    Div,
    IntDiv,
    Mod,
}

/// Binary operators by precedence level, lowest first.
const LEVELS: &[&[(&str, Op)]] = &[
    &[("implies", Op::Implies)],
    &[("or", Op::Or), ("xor", Op::Xor)],
    &[("and", Op::And)],
    &[("in", Op::In), ("contains", Op::Contains)],
    &[("=", Op::Eq), ("!=", Op::Ne)],
    &[("<=", Op::Le), (">=", Op::Ge), ("<", Op::Lt), (">", Op::Gt)],
    &[("|", Op::Union)],
    &[("+", Op::Add), ("-", Op::Sub), ("&", Op::Concat)],
    &[
        ("*", Op::Mul),
        ("/", Op::Div),
        ("div", Op::IntDiv),
        ("mod", Op::Mod),
    ],
];

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Num(String),
    DateTime(String),
    Var(String),
    This,
    Sym(&'static str),
}

/// The longest expression accepted, in bytes.
pub const MAX_LENGTH: usize = 4096;

/// The most tokens (names, literals, operators) accepted: compiling recurses along a path.
pub const MAX_TOKENS: usize = 256;

/// The deepest nesting (parentheses, arguments, operands) accepted: the parser and the
/// compiler recurse, and a hostile `((((...` must not exhaust the stack.
pub const MAX_DEPTH: usize = 32;

/// Parses a whole expression; the error says what is wrong and where (1-based character).
pub fn parse(text: &str) -> Result<Expr, String> {
    if text.len() > MAX_LENGTH {
        return Err(format!(
            "the expression is {} bytes long; at most {MAX_LENGTH} are accepted",
            text.len()
        ));
    }
    let tokens = lex(text)?;
    if tokens.len() > MAX_TOKENS {
        return Err(format!(
            "the expression has {} tokens; at most {MAX_TOKENS} are accepted",
            tokens.len()
        ));
    }
    let mut parser = Parser {
        tokens,
        at: 0,
        depth: 0,
    };
    let expr = parser.binary(0)?;
    match parser.tokens.get(parser.at) {
        None => Ok(expr),
        Some((token, position)) => Err(format!("unexpected {} at {position}", show(token))),
    }
}

fn show(token: &Token) -> String {
    match token {
        Token::Ident(name) => format!("'{name}'"),
        Token::Str(text) => format!("string '{text}'"),
        Token::Num(n) => format!("number {n}"),
        Token::DateTime(d) => format!("@{d}"),
        Token::Var(name) => format!("%{name}"),
        Token::This => "$this".into(),
        Token::Sym(sym) => format!("'{sym}'"),
    }
}

const SYMBOLS: &[&str] = &[
    "<=", ">=", "!=", "(", ")", "[", "]", "{", "}", ".", ",", "=", "<", ">", "|", "+", "-", "&",
    "*", "/",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn lex(text: &str) -> Result<Vec<(Token, usize)>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let take = |i: &mut usize, ok: &dyn Fn(char) -> bool| {
        let start = *i;
        while *i < chars.len() && ok(chars[*i]) {
            *i += 1;
        }
        chars[start..*i].iter().collect::<String>()
    };
    while i < chars.len() {
        let c = chars[i];
        let at = i + 1;
        if c.is_whitespace() {
            i += 1;
        } else if c == '\'' {
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err(format!("unterminated string starting at {at}")),
                    Some('\'') => break,
                    Some('\\') => {
                        let escaped = chars.get(i + 1).copied().unwrap_or('\\');
                        s.push(match escaped {
                            'n' => '\n',
                            't' => '\t',
                            'r' => '\r',
                            other => other,
                        });
                        i += 2;
                    }
                    Some(other) => {
                        s.push(*other);
                        i += 1;
                    }
                }
            }
            i += 1;
            tokens.push((Token::Str(s), at));
        } else if c == '`' {
            i += 1;
            let name = take(&mut i, &is_ident);
            if chars.get(i) != Some(&'`') || name.is_empty() {
                return Err(format!(
                    "a backquoted name at {at} may hold only letters, digits and _"
                ));
            }
            i += 1;
            tokens.push((Token::Ident(name), at));
        } else if c.is_ascii_digit() {
            let mut n = take(&mut i, &|c| c.is_ascii_digit());
            if chars.get(i) == Some(&'.') && chars.get(i + 1).is_some_and(char::is_ascii_digit) {
                i += 1;
                n.push('.');
                n.push_str(&take(&mut i, &|c| c.is_ascii_digit()));
            }
            tokens.push((Token::Num(n), at));
        } else if c == '@' {
            i += 1;
            let d = take(&mut i, &|c| c.is_ascii_alphanumeric() || "-:.+".contains(c));
            if d.is_empty() {
                return Err(format!("a date or time must follow '@' at {at}"));
            }
            tokens.push((Token::DateTime(d), at));
        } else if c == '%' {
            i += 1;
            let name = if chars.get(i) == Some(&'`') {
                i += 1;
                let name = take(&mut i, &is_ident);
                i += 1;
                name
            } else {
                take(&mut i, &is_ident)
            };
            if name.is_empty() {
                return Err(format!("a name must follow '%' at {at}"));
            }
            tokens.push((Token::Var(name), at));
        } else if c == '$' {
            i += 1;
            match take(&mut i, &is_ident).as_str() {
                "this" => tokens.push((Token::This, at)),
                other => return Err(format!("unsupported variable ${other} at {at}")),
            }
        } else if is_ident_start(c) {
            tokens.push((Token::Ident(take(&mut i, &is_ident)), at));
        } else if let Some(sym) = SYMBOLS
            .iter()
            .find(|s| chars[i..].iter().take(s.len()).copied().eq(s.chars()))
        {
            i += sym.len();
            tokens.push((Token::Sym(sym), at));
        } else {
            return Err(format!("unexpected character '{c}' at {at}"));
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<(Token, usize)>,
    at: usize,
    /// Nested `binary` calls now open.
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at).map(|(t, _)| t)
    }

    fn eat_sym(&mut self, sym: &str) -> bool {
        if matches!(self.peek(), Some(Token::Sym(s)) if *s == sym) {
            self.at += 1;
            return true;
        }
        false
    }

    fn expect_sym(&mut self, sym: &str) -> Result<(), String> {
        if self.eat_sym(sym) {
            return Ok(());
        }
        Err(match self.tokens.get(self.at) {
            Some((token, at)) => format!("expected '{sym}' at {at}, found {}", show(token)),
            None => format!("expected '{sym}' at the end"),
        })
    }

    /// The operator at the current token, if it is one of `level`'s.
    fn operator(&self, level: &[(&str, Op)]) -> Option<Op> {
        let text = match self.peek()? {
            Token::Sym(s) => *s,
            Token::Ident(name) => name.as_str(),
            _ => return None,
        };
        level.iter().find(|(t, _)| *t == text).map(|(_, op)| *op)
    }

    fn binary(&mut self, level: usize) -> Result<Expr, String> {
        if level == 0 {
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(format!("the expression nests more than {MAX_DEPTH} deep"));
            }
            let result = self.level(0);
            self.depth -= 1;
            return result;
        }
        self.level(level)
    }

    /// The operators of one precedence level, left-associative.
    fn level(&mut self, level: usize) -> Result<Expr, String> {
        let Some(ops) = LEVELS.get(level) else {
            return self.unary();
        };
        let mut left = self.operand(level)?;
        while let Some(op) = self.operator(ops) {
            self.at += 1;
            let right = self.operand(level)?;
            left = Expr::Binary(op, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    /// An operand of `level`'s operators. The operands of `|` are type expressions: FHIRPath
    /// puts `is` and `as` between `|` and `+` (`Observation.value as Quantity | ...`).
    fn operand(&mut self, level: usize) -> Result<Expr, String> {
        let mut expr = self.binary(level + 1)?;
        if LEVELS[level] != [("|", Op::Union)] {
            return Ok(expr);
        }
        while let Some(Token::Ident(word)) = self.peek() {
            let function = match word.as_str() {
                "as" => "ofType",
                "is" => "is",
                _ => break,
            };
            self.at += 1;
            let ty = self.type_specifier()?;
            expr = Expr::Call(Box::new(expr), function.into(), vec![ty]);
        }
        Ok(expr)
    }

    /// `Quantity` or `FHIR.Quantity`, as the argument `ofType(..)` takes.
    fn type_specifier(&mut self) -> Result<Expr, String> {
        let mut names = Vec::new();
        loop {
            match self.tokens.get(self.at) {
                Some((Token::Ident(name), _)) => names.push(name.clone()),
                Some((token, at)) => {
                    return Err(format!(
                        "expected a type name at {at}, found {}",
                        show(token)
                    ))
                }
                None => return Err("expected a type name at the end".into()),
            }
            self.at += 1;
            if names.len() == 2 || !self.eat_sym(".") {
                break;
            }
        }
        Ok(names
            .into_iter()
            .fold(Expr::This, |base, name| Expr::Member(Box::new(base), name)))
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.eat_sym("-") {
            return Ok(Expr::Neg(Box::new(self.unary()?)));
        }
        let mut expr = self.term()?;
        loop {
            if self.eat_sym(".") {
                expr = self.invocation(expr)?;
            } else if self.eat_sym("[") {
                let index = self.binary(0)?;
                self.expect_sym("]")?;
                expr = Expr::Index(Box::new(expr), Box::new(index));
            } else {
                return Ok(expr);
            }
        }
    }

    fn term(&mut self) -> Result<Expr, String> {
        let Some((token, at)) = self.tokens.get(self.at).cloned() else {
            return Err("the expression ends too early".into());
        };
        self.at += 1;
        Ok(match token {
            Token::Str(s) => Expr::Str(s),
            Token::Num(n) => Expr::Num(n),
            Token::DateTime(d) => Expr::DateTime(d),
            Token::Var(name) => Expr::Var(name),
            Token::This => Expr::This,
            Token::Ident(name) if name == "true" || name == "false" => Expr::Bool(name == "true"),
            Token::Ident(_) => {
                self.at -= 1;
                return self.invocation(Expr::This);
            }
            Token::Sym("(") => {
                let inner = self.binary(0)?;
                self.expect_sym(")")?;
                inner
            }
            Token::Sym("{") => {
                self.expect_sym("}")?;
                Expr::Empty
            }
            other => return Err(format!("unexpected {} at {at}", show(&other))),
        })
    }

    /// `name` or `name(args)` applied to `base`.
    fn invocation(&mut self, base: Expr) -> Result<Expr, String> {
        let name = match self.tokens.get(self.at) {
            Some((Token::Ident(name), _)) => name.clone(),
            Some((token, at)) => {
                return Err(format!("expected a name at {at}, found {}", show(token)))
            }
            None => return Err("expected a name at the end".into()),
        };
        self.at += 1;
        if !self.eat_sym("(") {
            return Ok(Expr::Member(Box::new(base), name));
        }
        let mut args = Vec::new();
        if !self.eat_sym(")") {
            loop {
                args.push(self.binary(0)?);
                if self.eat_sym(")") {
                    break;
                }
                self.expect_sym(",")?;
            }
        }
        Ok(Expr::Call(Box::new(base), name, args))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(base: Expr, name: &str) -> Expr {
        Expr::Member(Box::new(base), name.into())
    }

    #[test]
    fn paths_calls_and_precedence() {
        assert_eq!(
            parse("name.given").unwrap(),
            member(member(Expr::This, "name"), "given")
        );
        let e = parse("name.where(use = 'official' and family = 'f1').exists()").unwrap();
        let Expr::Call(base, name, args) = e else {
            panic!("a call")
        };
        assert_eq!(name, "exists");
        assert!(args.is_empty());
        assert!(matches!(*base, Expr::Call(_, ref w, _) if w == "where"));
        assert!(matches!(
            parse("a = 1 or b < 2 and c").unwrap(),
            Expr::Binary(Op::Or, _, _)
        ));
        assert!(matches!(
            parse("name[%i].family").unwrap(),
            Expr::Member(_, ref f) if f == "family"
        ));
        assert_eq!(
            parse("-1.50").unwrap(),
            Expr::Neg(Box::new(Expr::Num("1.50".into())))
        );
    }

    #[test]
    fn bad_expressions_say_where() {
        assert_eq!(
            parse("@@").unwrap_err(),
            "a date or time must follow '@' at 1"
        );
        assert_eq!(parse("name.").unwrap_err(), "expected a name at the end");
        assert_eq!(parse("a b").unwrap_err(), "unexpected 'b' at 3");
        assert!(parse("name.\"x\"").is_err());
        let deep = format!("{}1{}", "(".repeat(40), ")".repeat(40));
        assert_eq!(
            parse(&deep).unwrap_err(),
            "the expression nests more than 32 deep"
        );
        let long = vec!["a"; 200].join(".");
        assert!(parse(&long)
            .unwrap_err()
            .starts_with("the expression has 399 tokens"));
        assert!(parse(&"a".repeat(5000))
            .unwrap_err()
            .starts_with("the expression is 5000 bytes"));
    }
}
