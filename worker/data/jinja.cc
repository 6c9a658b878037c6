#include "worker/data/jinja.h"

#include <utf8proc.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <functional>
#include <initializer_list>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

#include "worker/data/unicode_text.h"

namespace lomo::jinja {
namespace {

using json = nlohmann::ordered_json;

// ---------------------------------------------------------------------------------------------
// Values, with Python's semantics for truth, equality and printing.

struct Value;
using List = std::vector<Value>;
using Dict = std::vector<std::pair<std::string, Value>>;  // insertion-ordered, as Python's
using Args = std::vector<Value>;
using Kwargs = std::vector<std::pair<std::string, Value>>;
using Function = std::function<Value(Args&, Kwargs&)>;

struct Value {
  enum class Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kFunction };
  Kind kind = Kind::kUndefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;
  std::shared_ptr<List> list;
  std::shared_ptr<Dict> dict;  // also a namespace(), whose attributes `set` may assign
  std::shared_ptr<Function> function;
  bool is_namespace = false;

  static Value none() { return with(Kind::kNone); }
  static Value boolean(bool v) {
    Value x = with(Kind::kBool);
    x.b = v;
    return x;
  }
  static Value integer(int64_t v) {
    Value x = with(Kind::kInt);
    x.i = v;
    return x;
  }
  static Value real(double v) {
    Value x = with(Kind::kFloat);
    x.f = v;
    return x;
  }
  static Value string(std::string v) {
    Value x = with(Kind::kString);
    x.s = std::move(v);
    return x;
  }
  static Value of_list(List v) {
    Value x = with(Kind::kList);
    x.list = std::make_shared<List>(std::move(v));
    return x;
  }
  static Value of_dict(Dict v) {
    Value x = with(Kind::kDict);
    x.dict = std::make_shared<Dict>(std::move(v));
    return x;
  }
  static Value of_function(Function v) {
    Value x = with(Kind::kFunction);
    x.function = std::make_shared<Function>(std::move(v));
    return x;
  }
  static Value with(Kind kind) {
    Value x;
    x.kind = kind;
    return x;
  }

  bool undefined() const { return kind == Kind::kUndefined; }
  bool is_number() const {
    return kind == Kind::kInt || kind == Kind::kFloat || kind == Kind::kBool;
  }
  double number() const {
    return kind == Kind::kFloat ? f : static_cast<double>(kind == Kind::kBool ? b : i);
  }
  const Value* find(std::string_view key) const {
    if (kind != Kind::kDict) return nullptr;
    for (const auto& [k, v] : *dict) {
      if (k == key) return &v;
    }
    return nullptr;
  }
};

Value from_json(const json& j) {
  switch (j.type()) {
    case json::value_t::null:
      return Value::none();
    case json::value_t::boolean:
      return Value::boolean(j.get<bool>());
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
      return Value::integer(j.get<int64_t>());
    case json::value_t::number_float:
      return Value::real(j.get<double>());
    case json::value_t::string:
      return Value::string(j.get<std::string>());
    case json::value_t::array: {
      List list;
      for (const json& item : j) list.push_back(from_json(item));
      return Value::of_list(std::move(list));
    }
    case json::value_t::object: {
      Dict dict;
      for (const auto& [key, item] : j.items()) dict.emplace_back(key, from_json(item));
      return Value::of_dict(std::move(dict));
    }
    default:
      return Value();
  }
}

bool truthy(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return false;
    case Value::Kind::kBool:
      return v.b;
    case Value::Kind::kInt:
      return v.i != 0;
    case Value::Kind::kFloat:
      return v.f != 0;
    case Value::Kind::kString:
      return !v.s.empty();
    case Value::Kind::kList:
      return !v.list->empty();
    case Value::Kind::kDict:
      return !v.dict->empty();
    case Value::Kind::kFunction:
      return true;
  }
  return false;
}

std::string python_float(double f) {
  if (std::isnan(f)) return "nan";
  if (std::isinf(f)) return f > 0 ? "inf" : "-inf";
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, f);
  std::string out(buffer, result.ptr);
  if (out.find_first_of(".en") == std::string::npos) out += ".0";
  return out;
}

std::string repr(const Value& v);

std::string str(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return "";
    case Value::Kind::kNone:
      return "None";
    case Value::Kind::kBool:
      return v.b ? "True" : "False";
    case Value::Kind::kInt:
      return std::to_string(v.i);
    case Value::Kind::kFloat:
      return python_float(v.f);
    case Value::Kind::kString:
      return v.s;
    default:
      return repr(v);
  }
}

std::string repr(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kString: {
      const char quote =
          v.s.find('\'') != std::string::npos && v.s.find('"') == std::string::npos ? '"' : '\'';
      std::string out(1, quote);
      for (const char ch : v.s) {
        if (ch == '\\' || ch == quote) out += '\\';
        if (ch == '\n') {
          out += "\\n";
        } else {
          out += ch;
        }
      }
      return out + quote;
    }
    case Value::Kind::kList: {
      std::string out = "[";
      for (size_t i = 0; i < v.list->size(); ++i) out += (i ? ", " : "") + repr((*v.list)[i]);
      return out + "]";
    }
    case Value::Kind::kDict: {
      std::string out = v.is_namespace ? "<Namespace {" : "{";
      for (size_t i = 0; i < v.dict->size(); ++i) {
        out += (i ? ", " : "") + repr(Value::string((*v.dict)[i].first)) + ": " +
               repr((*v.dict)[i].second);
      }
      return out + (v.is_namespace ? "}>" : "}");
    }
    case Value::Kind::kFunction:
      return "<function>";
    default:
      return str(v);
  }
}

bool equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) return a.number() == b.number();
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::Kind::kString:
      return a.s == b.s;
    case Value::Kind::kList:
      if (a.list->size() != b.list->size()) return false;
      for (size_t i = 0; i < a.list->size(); ++i) {
        if (!equal((*a.list)[i], (*b.list)[i])) return false;
      }
      return true;
    case Value::Kind::kDict:
      if (a.dict->size() != b.dict->size()) return false;
      for (const auto& [key, value] : *a.dict) {
        const Value* other = b.find(key);
        if (other == nullptr || !equal(value, *other)) return false;
      }
      return true;
    case Value::Kind::kFunction:
      return a.function == b.function;
    default:
      return true;  // undefined, none
  }
}

// json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=...): transformers' tojson.
void to_json(const Value& v, std::optional<int> indent, int depth, bool sort_keys,
             std::string& out) {
  const auto newline = [&](int level) {
    if (!indent) return;
    out += '\n';
    // Python indents by ' ' * indent: nothing for a negative indent.
    out.append(static_cast<size_t>(std::max(*indent, 0)) * static_cast<size_t>(level), ' ');
  };
  switch (v.kind) {
    case Value::Kind::kNone:
    case Value::Kind::kUndefined:
      out += "null";
      return;
    case Value::Kind::kBool:
      out += v.b ? "true" : "false";
      return;
    case Value::Kind::kInt:
      out += std::to_string(v.i);
      return;
    case Value::Kind::kFloat:
      out += std::isnan(v.f)   ? "NaN"
             : std::isinf(v.f) ? (v.f > 0 ? "Infinity" : "-Infinity")
                               : python_float(v.f);
      return;
    case Value::Kind::kString:
      out += json(v.s).dump(-1, ' ', false, json::error_handler_t::replace);
      return;
    case Value::Kind::kList: {
      if (v.list->empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t i = 0; i < v.list->size(); ++i) {
        if (i) out += indent ? "," : ", ";
        newline(depth + 1);
        to_json((*v.list)[i], indent, depth + 1, sort_keys, out);
      }
      newline(depth);
      out += ']';
      return;
    }
    case Value::Kind::kDict: {
      if (v.dict->empty()) {
        out += "{}";
        return;
      }
      std::vector<const std::pair<std::string, Value>*> items;
      for (const auto& item : *v.dict) items.push_back(&item);
      if (sort_keys) {
        std::stable_sort(items.begin(), items.end(),
                         [](const auto* a, const auto* b) { return a->first < b->first; });
      }
      out += '{';
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += indent ? "," : ", ";
        newline(depth + 1);
        out += json(items[i]->first).dump(-1, ' ', false, json::error_handler_t::replace);
        out += ": ";
        to_json(items[i]->second, indent, depth + 1, sort_keys, out);
      }
      newline(depth);
      out += '}';
      return;
    }
    case Value::Kind::kFunction:
      throw std::invalid_argument("a function is not JSON serializable");
  }
}

// ---------------------------------------------------------------------------------------------
// Lexing: the template becomes text, tag delimiters and expression tokens, with trim_blocks,
// lstrip_blocks and "-" whitespace control applied to the text.

enum class Tok {
  kText,
  kVarBegin,
  kVarEnd,
  kBlockBegin,
  kBlockEnd,
  kName,
  kString,
  kInt,
  kFloat,
  kOp,
  kEnd
};

struct Token {
  Tok kind;
  std::string text;
  size_t offset;  // in the source, for messages
};

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

class Lexer {
 public:
  Lexer(std::string_view source, const std::function<void(size_t, const std::string&)>& fail)
      : source_(source), fail_(fail) {}

  std::vector<Token> run() {
    size_t text_start = 0;
    size_t at = 0;
    while (at < source_.size()) {
      const size_t open = source_.find('{', at);
      if (open == std::string_view::npos || open + 1 >= source_.size()) break;
      const char kind = source_[open + 1];
      if (kind != '{' && kind != '%' && kind != '#') {
        at = open + 1;
        continue;
      }
      emit_text(text_start, open);
      at = kind == '#' ? comment(open) : tag(open, kind);
      text_start = at;
    }
    emit_text(text_start, source_.size());
    tokens_.push_back({Tok::kEnd, "", source_.size()});
    return std::move(tokens_);
  }

 private:
  // Text [from, to) before a tag at `to` (or the end of the source), after whitespace control:
  // "-" strips all white space on its side; trim_blocks drops the first newline after a block
  // tag or comment; lstrip_blocks removes spaces and tabs between the start of a line and a
  // block tag or comment ("{%+" keeps them).
  void emit_text(size_t from, size_t to) {
    size_t start = from;
    if (trim_next_) {
      while (start < to && is_space(source_[start])) ++start;
    } else if (skip_newline_ && start < to && source_[start] == '\n') {
      ++start;
    }
    trim_next_ = skip_newline_ = false;
    size_t end = to;
    if (to + 2 < source_.size()) {
      const char kind = source_[to + 1];
      const char modifier = source_[to + 2];
      if (modifier == '-') {
        while (end > start && is_space(source_[end - 1])) --end;
      } else if (kind != '{' && modifier != '+') {
        const size_t newline = to == 0 ? std::string_view::npos : source_.rfind('\n', to - 1);
        const size_t line_start = newline == std::string_view::npos ? 0 : newline + 1;
        const std::string_view indent = source_.substr(line_start, to - line_start);
        if (line_start >= from && indent.find_first_not_of(" \t") == std::string_view::npos) {
          end = std::max(start, line_start);
        }
      }
    }
    if (start < end)
      tokens_.push_back({Tok::kText, std::string(source_.substr(start, end - start)), start});
  }

  size_t comment(size_t open) {
    const size_t close = source_.find("#}", open + 2);
    if (close == std::string_view::npos) fail_(open, "unclosed comment");
    after_tag(close, '#');
    return close + 2;
  }

  void after_tag(size_t close, char kind) {
    const char before = close > 0 ? source_[close - 1] : 0;
    trim_next_ = before == '-';
    skip_newline_ = kind != '{' && before != '+' && !trim_next_;
  }

  size_t tag(size_t open, char kind) {
    tokens_.push_back({kind == '{' ? Tok::kVarBegin : Tok::kBlockBegin, "", open});
    size_t at = open + 2;
    if (at < source_.size() && (source_[at] == '-' || source_[at] == '+')) ++at;
    const std::string_view close = kind == '{' ? "}}" : "%}";
    // As Jinja's lexer: "}}" inside open brackets closes them, not the tag ({'a': {'b': 1}}).
    int depth = 0;
    while (true) {
      while (at < source_.size() && is_space(source_[at])) ++at;
      if (at >= source_.size())
        fail_(open, std::string("unclosed tag, expected \"") + std::string(close) + "\"");
      if (depth == 0 &&
          (source_.substr(at, 2) == close ||
           ((source_[at] == '-' || source_[at] == '+') && source_.substr(at + 1, 2) == close))) {
        const size_t end = source_[at] == '-' || source_[at] == '+' ? at + 1 : at;
        tokens_.push_back({kind == '{' ? Tok::kVarEnd : Tok::kBlockEnd, "", at});
        after_tag(end, kind);
        return end + 2;
      }
      at = expression_token(at);
      if (tokens_.back().kind == Tok::kOp) {
        const std::string& op = tokens_.back().text;
        if (op == "(" || op == "[" || op == "{") ++depth;
        if ((op == ")" || op == "]" || op == "}") && depth > 0) --depth;
      }
    }
  }

  size_t expression_token(size_t at) {
    const char c = source_[at];
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t end = at;
      while (end < source_.size() &&
             (std::isalnum(static_cast<unsigned char>(source_[end])) || source_[end] == '_')) {
        ++end;
      }
      tokens_.push_back({Tok::kName, std::string(source_.substr(at, end - at)), at});
      return end;
    }
    if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t end = at;
      bool real = false;
      while (end < source_.size() &&
             (std::isdigit(static_cast<unsigned char>(source_[end])) ||
              (source_[end] == '.' && !real && end + 1 < source_.size() &&
               std::isdigit(static_cast<unsigned char>(source_[end + 1]))))) {
        real = real || source_[end] == '.';
        ++end;
      }
      tokens_.push_back(
          {real ? Tok::kFloat : Tok::kInt, std::string(source_.substr(at, end - at)), at});
      return end;
    }
    if (c == '"' || c == '\'') return string_token(at);
    static constexpr std::string_view kTwo[] = {"==", "!=", "<=", ">=", "//", "**"};
    for (const std::string_view op : kTwo) {
      if (source_.substr(at, 2) == op) {
        tokens_.push_back({Tok::kOp, std::string(op), at});
        return at + 2;
      }
    }
    if (std::string_view("+-*/%~<>=()[]{}.,:|").find(c) != std::string_view::npos) {
      tokens_.push_back({Tok::kOp, std::string(1, c), at});
      return at + 1;
    }
    fail_(at, std::string("unexpected character '") + c + "'");
    return at;
  }

  // Python string literals: the escapes \n \t \r \\ \' \" (others kept as written).
  size_t string_token(size_t at) {
    const char quote = source_[at];
    std::string value;
    size_t i = at + 1;
    for (; i < source_.size() && source_[i] != quote; ++i) {
      if (source_[i] == '\\' && i + 1 < source_.size()) {
        const char e = source_[++i];
        switch (e) {
          case 'n':
            value += '\n';
            break;
          case 't':
            value += '\t';
            break;
          case 'r':
            value += '\r';
            break;
          case '\\':
          case '\'':
          case '"':
            value += e;
            break;
          default:
            value += '\\';
            value += e;
        }
      } else {
        value += source_[i];
      }
    }
    if (i >= source_.size()) fail_(at, "unterminated string");
    tokens_.push_back({Tok::kString, std::move(value), at});
    return i + 1;
  }

  std::string_view source_;
  const std::function<void(size_t, const std::string&)>& fail_;
  std::vector<Token> tokens_;
  bool trim_next_ = false;
  bool skip_newline_ = false;
};

// ---------------------------------------------------------------------------------------------
// The syntax tree.

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class Kind {
    kLiteral,
    kName,
    kList,
    kDict,
    kAttr,
    kItem,
    kSlice,
    kCall,
    kFilter,
    kTest,
    kNot,
    kNeg,
    kBinary,
    kAnd,
    kOr,
    kCond
  };
  Kind kind;
  size_t offset = 0;
  Value literal;
  std::string name;           // name, attribute, filter, test, or binary operator
  std::vector<ExprPtr> args;  // operands, items, call/filter/test arguments (dict: key, value...)
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  bool negated = false;  // "is not", "not in"
};

struct Node;
using Body = std::vector<std::unique_ptr<Node>>;

struct Node {
  enum class Kind { kText, kOutput, kIf, kFor, kSet, kBreak, kContinue, kGeneration, kMacro };
  Kind kind;
  size_t offset = 0;
  std::string text;  // kText
  ExprPtr expr;      // kOutput, kSet value (null: a block set), kFor iterable
  std::vector<std::pair<ExprPtr, Body>> branches;  // kIf (condition, body)
  Body body;                                       // kFor, kGeneration, kSet as a block
  Body else_body;                                  // kIf, kFor
  std::vector<std::string> targets;  // kFor; kSet: name or namespace, attribute; kMacro: name,
                                     // then its parameters
  std::vector<ExprPtr> defaults;     // kMacro: each parameter's default (null: none)
  ExprPtr loop_filter;               // kFor "... if condition"
};

std::unique_ptr<Node> new_node(Node::Kind kind, size_t offset) {
  auto node = std::make_unique<Node>();
  node->kind = kind;
  node->offset = offset;
  return node;
}

// ---------------------------------------------------------------------------------------------
// Parsing, with Jinja's operator precedence.

class Parser {
 public:
  Parser(std::vector<Token> tokens, const std::function<void(size_t, const std::string&)>& fail)
      : tokens_(std::move(tokens)), fail_(fail) {}

  Body parse() {
    std::string stop;
    Body body = parse_body({}, stop);
    return body;
  }

 private:
  const Token& peek(size_t ahead = 0) const {
    return tokens_[std::min(at_ + ahead, tokens_.size() - 1)];
  }
  const Token& next() { return tokens_[std::min(at_++, tokens_.size() - 1)]; }
  bool is_op(std::string_view op, size_t ahead = 0) const {
    return peek(ahead).kind == Tok::kOp && peek(ahead).text == op;
  }
  bool is_name(std::string_view name, size_t ahead = 0) const {
    return peek(ahead).kind == Tok::kName && peek(ahead).text == name;
  }
  void expect_op(std::string_view op) {
    if (!is_op(op)) fail_(peek().offset, "expected '" + std::string(op) + "'" + found());
    next();
  }
  std::string found() const {
    const Token& t = peek();
    switch (t.kind) {
      case Tok::kEnd:
        return ", found the end of the template";
      case Tok::kBlockEnd:
        return ", found '%}'";
      case Tok::kVarEnd:
        return ", found '}}'";
      default:
        return ", found '" + t.text + "'";
    }
  }
  std::string expect_name() {
    if (peek().kind != Tok::kName) fail_(peek().offset, "expected a name" + found());
    return next().text;
  }
  void expect_block_end() {
    if (peek().kind != Tok::kBlockEnd) fail_(peek().offset, "expected '%}'" + found());
    next();
  }

  // Statements until one of `stops` ("endfor", "elif", ...); its name goes to `stop`.
  Body parse_body(const std::vector<std::string_view>& stops, std::string& stop) {
    Body body;
    while (true) {
      const Token& t = peek();
      if (t.kind == Tok::kEnd) {
        if (!stops.empty()) {
          fail_(t.offset, "missing {% " + std::string(stops.back()) + " %}");
        }
        return body;
      }
      if (t.kind == Tok::kText) {
        auto node = new_node(Node::Kind::kText, t.offset);
        node->text = next().text;
        body.push_back(std::move(node));
      } else if (t.kind == Tok::kVarBegin) {
        next();
        auto node = new_node(Node::Kind::kOutput, t.offset);
        node->expr = expression();
        if (peek().kind != Tok::kVarEnd) fail_(peek().offset, "expected '}}'" + found());
        next();
        body.push_back(std::move(node));
      } else {
        next();  // {%
        const Token& keyword = peek();
        if (keyword.kind != Tok::kName) fail_(keyword.offset, "expected a statement" + found());
        if (std::find(stops.begin(), stops.end(), keyword.text) != stops.end()) {
          stop = next().text;
          return body;
        }
        body.push_back(statement());
      }
    }
  }

  std::unique_ptr<Node> statement() {
    const DepthGuard guard(*this);
    const Token keyword = next();
    auto node = new_node(Node::Kind::kText, keyword.offset);
    std::string stop;
    if (keyword.text == "if") {
      node->kind = Node::Kind::kIf;
      ExprPtr condition = expression();
      expect_block_end();
      while (true) {
        Body body = parse_body({"elif", "else", "endif"}, stop);
        node->branches.emplace_back(std::move(condition), std::move(body));
        if (stop != "elif") break;
        condition = expression();
        expect_block_end();
      }
      if (stop == "else") {
        expect_block_end();
        node->else_body = parse_body({"endif"}, stop);
      }
      expect_block_end();
    } else if (keyword.text == "for") {
      node->kind = Node::Kind::kFor;
      node->targets.push_back(expect_name());
      while (is_op(",")) {
        next();
        node->targets.push_back(expect_name());
      }
      if (!is_name("in")) fail_(peek().offset, "expected 'in'" + found());
      next();
      node->expr = or_expr();  // no conditional expression: "if" filters the loop
      if (is_name("if")) {
        next();
        node->loop_filter = or_expr();
      }
      if (is_name("recursive")) fail_(peek().offset, "recursive loops are not supported");
      expect_block_end();
      node->body = parse_body({"else", "endfor"}, stop);
      if (stop == "else") {
        expect_block_end();
        node->else_body = parse_body({"endfor"}, stop);
      }
      expect_block_end();
    } else if (keyword.text == "set") {
      node->kind = Node::Kind::kSet;
      node->targets.push_back(expect_name());
      if (is_op(".")) {
        next();
        node->targets.push_back(expect_name());
      }
      if (peek().kind == Tok::kBlockEnd) {
        // {% set name %}...{% endset %}: the rendered body, a string.
        next();
        node->body = parse_body({"endset"}, stop);
        expect_block_end();
        return node;
      }
      if (!is_op("=")) {
        fail_(peek().offset,
              "expected '=' or '%}' ({% set %} filters and unpacking are not supported)" + found());
      }
      next();
      node->expr = expression();
      expect_block_end();
    } else if (keyword.text == "macro") {
      macro(*node);
    } else if (keyword.text == "break" || keyword.text == "continue") {
      node->kind = keyword.text == "break" ? Node::Kind::kBreak : Node::Kind::kContinue;
      expect_block_end();
    } else if (keyword.text == "generation") {
      node->kind = Node::Kind::kGeneration;
      expect_block_end();
      node->body = parse_body({"endgeneration"}, stop);
      expect_block_end();
    } else {
      fail_(keyword.offset, "unsupported statement '" + keyword.text + "'");
    }
    return node;
  }

  // {% macro name(a, b=default, ...) %}body{% endmacro %} (no *varargs, **kwargs or caller).
  void macro(Node& node) {
    node.kind = Node::Kind::kMacro;
    node.targets.push_back(expect_name());
    expect_op("(");
    while (!is_op(")")) {
      node.targets.push_back(expect_name());
      ExprPtr default_value;
      if (is_op("=")) {
        next();
        default_value = expression();
      } else if (std::any_of(node.defaults.begin(), node.defaults.end(),
                             [](const ExprPtr& d) { return d != nullptr; })) {
        fail_(peek().offset, "a parameter without a default follows one with a default");
      }
      node.defaults.push_back(std::move(default_value));
      if (!is_op(",")) break;
      next();
    }
    expect_op(")");
    expect_block_end();
    std::string stop;
    node.body = parse_body({"endmacro"}, stop);
    expect_block_end();
  }

  ExprPtr make(Expr::Kind kind, size_t offset) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->offset = offset;
    return e;
  }

  ExprPtr expression() {
    const DepthGuard guard(*this);
    ExprPtr value = or_expr();
    while (is_name("if")) {
      const size_t offset = next().offset;
      auto cond = make(Expr::Kind::kCond, offset);
      cond->args.push_back(or_expr());
      cond->args.push_back(std::move(value));
      if (is_name("else")) {
        next();
        cond->args.push_back(expression());
      }
      value = std::move(cond);
    }
    return value;
  }

  ExprPtr or_expr() {
    ExprPtr left = and_expr();
    while (is_name("or")) {
      auto e = make(Expr::Kind::kOr, next().offset);
      e->args.push_back(std::move(left));
      e->args.push_back(and_expr());
      left = std::move(e);
    }
    return left;
  }

  ExprPtr and_expr() {
    ExprPtr left = not_expr();
    while (is_name("and")) {
      auto e = make(Expr::Kind::kAnd, next().offset);
      e->args.push_back(std::move(left));
      e->args.push_back(not_expr());
      left = std::move(e);
    }
    return left;
  }

  ExprPtr not_expr() {
    const DepthGuard guard(*this);
    if (is_name("not")) {
      auto e = make(Expr::Kind::kNot, next().offset);
      e->args.push_back(not_expr());
      return e;
    }
    return compare();
  }

  ExprPtr compare() {
    ExprPtr left = math1();
    while (true) {
      std::string op;
      bool negated = false;
      if (peek().kind == Tok::kOp &&
          (peek().text == "==" || peek().text == "!=" || peek().text == "<" ||
           peek().text == "<=" || peek().text == ">" || peek().text == ">=")) {
        op = peek().text;
      } else if (is_name("in")) {
        op = "in";
      } else if (is_name("not") && is_name("in", 1)) {
        op = "in";
        negated = true;
        next();
      } else {
        return left;
      }
      auto e = make(Expr::Kind::kBinary, next().offset);
      e->name = op;
      e->negated = negated;
      e->args.push_back(std::move(left));
      e->args.push_back(math1());
      left = std::move(e);
    }
  }

  ExprPtr binary(std::initializer_list<std::string_view> ops, ExprPtr (Parser::*operand)()) {
    ExprPtr left = (this->*operand)();
    while (peek().kind == Tok::kOp && std::find(ops.begin(), ops.end(), peek().text) != ops.end()) {
      auto e = make(Expr::Kind::kBinary, peek().offset);
      e->name = next().text;
      e->args.push_back(std::move(left));
      e->args.push_back((this->*operand)());
      left = std::move(e);
    }
    return left;
  }
  ExprPtr math1() { return binary({"+", "-"}, &Parser::concat); }
  ExprPtr concat() { return binary({"~"}, &Parser::math2); }
  ExprPtr math2() { return binary({"*", "/", "//", "%"}, &Parser::power); }
  ExprPtr power() { return binary({"**"}, &Parser::unary); }

  ExprPtr unary() {
    const DepthGuard guard(*this);
    if (is_op("-") || is_op("+")) {
      const bool minus = is_op("-");
      const size_t offset = next().offset;
      ExprPtr operand = unary();
      if (!minus) return operand;
      auto e = make(Expr::Kind::kNeg, offset);
      e->args.push_back(std::move(operand));
      return e;
    }
    return filters_and_tests(postfix(primary()));
  }

  ExprPtr filters_and_tests(ExprPtr value) {
    while (true) {
      if (is_op("|")) {
        auto e = make(Expr::Kind::kFilter, next().offset);
        e->name = expect_name();
        e->args.push_back(std::move(value));
        if (is_op("(")) call_arguments(*e);
        value = std::move(e);
      } else if (is_name("is")) {
        auto e = make(Expr::Kind::kTest, next().offset);
        if (is_name("not")) {
          next();
          e->negated = true;
        }
        e->name = expect_name();
        e->args.push_back(std::move(value));
        if (is_op("(")) {
          call_arguments(*e);
        } else if (peek().kind == Tok::kString || peek().kind == Tok::kInt ||
                   peek().kind == Tok::kFloat) {
          e->args.push_back(primary());  // "is divisibleby 3", "is equalto 'x'"
        }
        value = std::move(e);
      } else {
        return value;
      }
    }
  }

  void call_arguments(Expr& call) {
    expect_op("(");
    while (!is_op(")")) {
      if (peek().kind == Tok::kName && is_op("=", 1)) {
        std::string name = next().text;
        next();
        call.kwargs.emplace_back(std::move(name), expression());
      } else {
        call.args.push_back(expression());
      }
      if (!is_op(",")) break;
      next();
    }
    expect_op(")");
  }

  ExprPtr postfix(ExprPtr value) {
    while (true) {
      if (is_op(".")) {
        auto e = make(Expr::Kind::kAttr, next().offset);
        if (peek().kind == Tok::kInt) {
          e->kind = Expr::Kind::kItem;
          auto index = make(Expr::Kind::kLiteral, peek().offset);
          index->literal = Value::integer(std::stoll(next().text));
          e->args.push_back(std::move(value));
          e->args.push_back(std::move(index));
        } else {
          e->name = expect_name();
          e->args.push_back(std::move(value));
        }
        value = std::move(e);
      } else if (is_op("[")) {
        value = subscript(std::move(value));
      } else if (is_op("(")) {
        auto e = make(Expr::Kind::kCall, value->offset);
        e->args.push_back(std::move(value));
        call_arguments(*e);
        value = std::move(e);
      } else {
        return value;
      }
    }
  }

  ExprPtr subscript(ExprPtr value) {
    const size_t offset = next().offset;  // [
    std::vector<ExprPtr> parts(3);
    size_t part = 0;
    bool slice = false;
    while (!is_op("]")) {
      if (is_op(":")) {
        next();
        slice = true;
        if (++part > 2) fail_(peek().offset, "a slice has at most three parts");
        continue;
      }
      if (parts[part]) fail_(peek().offset, "expected ':' or ']'" + found());
      parts[part] = expression();
    }
    next();  // ]
    auto e = make(slice ? Expr::Kind::kSlice : Expr::Kind::kItem, offset);
    e->args.push_back(std::move(value));
    if (!slice && !parts[0]) fail_(offset, "empty subscript");
    for (size_t i = 0; i < (slice ? 3u : 1u); ++i) e->args.push_back(std::move(parts[i]));
    return e;
  }

  ExprPtr primary() {
    const Token& t = peek();
    auto e = make(Expr::Kind::kLiteral, t.offset);
    switch (t.kind) {
      case Tok::kString: {
        std::string text = next().text;
        while (peek().kind == Tok::kString) text += next().text;  // adjacent literals join
        e->literal = Value::string(std::move(text));
        return e;
      }
      case Tok::kInt:
        e->literal = Value::integer(std::stoll(next().text));
        return e;
      case Tok::kFloat:
        e->literal = Value::real(std::stod(next().text));
        return e;
      case Tok::kName: {
        const std::string name = next().text;
        if (name == "true" || name == "True") {
          e->literal = Value::boolean(true);
        } else if (name == "false" || name == "False") {
          e->literal = Value::boolean(false);
        } else if (name == "none" || name == "None") {
          e->literal = Value::none();
        } else {
          e->kind = Expr::Kind::kName;
          e->name = name;
        }
        return e;
      }
      case Tok::kOp:
        if (t.text == "(") return parenthesized();
        if (t.text == "[") return sequence("]", Expr::Kind::kList);
        if (t.text == "{") return sequence("}", Expr::Kind::kDict);
        [[fallthrough]];
      default:
        fail_(t.offset, "expected an expression" + found());
        return e;
    }
  }

  ExprPtr parenthesized() {
    const size_t offset = next().offset;
    if (is_op(")")) {
      next();
      return make(Expr::Kind::kList, offset);  // () is an empty tuple
    }
    ExprPtr first = expression();
    if (!is_op(",")) {
      expect_op(")");
      return first;
    }
    auto tuple = make(Expr::Kind::kList, offset);  // tuples behave as lists here
    tuple->args.push_back(std::move(first));
    while (is_op(",")) {
      next();
      if (is_op(")")) break;
      tuple->args.push_back(expression());
    }
    expect_op(")");
    return tuple;
  }

  ExprPtr sequence(std::string_view close, Expr::Kind kind) {
    auto e = make(kind, next().offset);
    while (!is_op(close)) {
      e->args.push_back(expression());
      if (kind == Expr::Kind::kDict) {
        expect_op(":");
        e->args.push_back(expression());
      }
      if (!is_op(",")) break;
      next();
    }
    expect_op(close);
    return e;
  }

  // Bounds the parser's (and so the renderer's) recursion: real templates nest a few levels.
  struct DepthGuard {
    DepthGuard(Parser& parser) : parser_(parser) {
      if (++parser_.depth_ > kMaxDepth) {
        parser_.fail_(parser_.peek().offset, "nesting deeper than " + std::to_string(kMaxDepth));
      }
    }
    ~DepthGuard() { --parser_.depth_; }
    Parser& parser_;
  };
  static constexpr int kMaxDepth = 100;

  std::vector<Token> tokens_;
  size_t at_ = 0;
  int depth_ = 0;
  const std::function<void(size_t, const std::string&)>& fail_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Rendering.

struct Template::Impl {
  std::string name;
  std::string source;
  Body body;

  [[noreturn]] void fail(size_t offset, const std::string& what) const {
    size_t line = 1;
    size_t column = 1;
    for (size_t i = 0; i < offset && i < source.size(); ++i) {
      if (source[i] == '\n') {
        ++line;
        column = 1;
      } else {
        ++column;
      }
    }
    throw TemplateError("chat template " + name + ":" + std::to_string(line) + ":" +
                        std::to_string(column) + ": " + what);
  }
};

namespace {

enum class Flow { kNormal, kBreak, kContinue };

class Renderer {
 public:
  Renderer(const Template::Impl& impl, const json& context) : impl_(impl) {
    scopes_.emplace_back();
    auto& globals = scopes_.back();
    if (context.is_object()) {
      for (const auto& [key, value] : context.items()) globals[key] = from_json(value);
    }
    globals["raise_exception"] = Value::of_function([](Args& args, Kwargs&) -> Value {
      throw std::invalid_argument("raise_exception: " + (args.empty() ? "" : str(args[0])));
    });
    globals["namespace"] = Value::of_function([](Args& args, Kwargs& kwargs) {
      Dict dict;
      if (!args.empty() && args[0].kind == Value::Kind::kDict) dict = *args[0].dict;
      for (auto& [k, v] : kwargs) dict.emplace_back(k, v);
      Value ns = Value::of_dict(std::move(dict));
      ns.is_namespace = true;
      return ns;
    });
    globals["range"] = Value::of_function([](Args& args, Kwargs&) {
      int64_t start = 0, stop = 0, step = 1;
      if (args.size() == 1) stop = args[0].i;
      if (args.size() >= 2) start = args[0].i, stop = args[1].i;
      if (args.size() >= 3) step = args[2].i;
      if (step == 0) throw std::invalid_argument("range() step must not be zero");
      List list;
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
        list.push_back(Value::integer(i));
      }
      return Value::of_list(std::move(list));
    });
  }

  void render(const Body& body, std::string& out) {
    if (run(body, out) != Flow::kNormal) impl_.fail(0, "break or continue outside a loop");
  }

 private:
  Flow run(const Body& body, std::string& out) {
    for (const auto& node : body) {
      const Flow flow = run(*node, out);
      if (flow != Flow::kNormal) return flow;
    }
    return Flow::kNormal;
  }

  Flow run(const Node& node, std::string& out) {
    switch (node.kind) {
      case Node::Kind::kText:
        out += node.text;
        return Flow::kNormal;
      case Node::Kind::kOutput:
        out += str(eval(*node.expr));
        return Flow::kNormal;
      case Node::Kind::kIf:
        for (const auto& [condition, body] : node.branches) {
          if (truthy(eval(*condition))) return run(body, out);
        }
        return run(node.else_body, out);
      case Node::Kind::kFor:
        return run_for(node, out);
      case Node::Kind::kSet:
        set(node);
        return Flow::kNormal;
      case Node::Kind::kBreak:
        return Flow::kBreak;
      case Node::Kind::kContinue:
        return Flow::kContinue;
      case Node::Kind::kGeneration:
        return run(node.body, out);
      case Node::Kind::kMacro:
        scopes_.back()[node.targets[0]] = macro(node);
        return Flow::kNormal;
    }
    return Flow::kNormal;
  }

  // A macro as a function: called, it renders its body in a scope of its own over the
  // template's globals as they are at the call and the local variables (loop ones included) as
  // they were where it was defined, as Jinja's closures do, never the caller's locals; it
  // returns the text.
  Value macro(const Node& node) {
    auto closure = std::make_shared<const std::vector<std::unordered_map<std::string, Value>>>(
        scopes_.begin() + 1, scopes_.end());
    return Value::of_function([this, &node, closure](Args& args, Kwargs& kwargs) -> Value {
      const std::string& name = node.targets[0];
      const size_t count = node.targets.size() - 1;
      if (args.size() > count) {
        throw std::invalid_argument("macro '" + name + "' takes not more than " +
                                    std::to_string(count) + " argument(s)");
      }
      // Bounded in total too: two recursive calls per level would otherwise take 2^depth calls.
      if (++macro_calls_ > kMaxMacroCalls) {
        throw std::invalid_argument("more than " + std::to_string(kMaxMacroCalls) +
                                    " macro calls in one rendering");
      }
      if (++macro_depth_ > kMaxMacroDepth) {
        --macro_depth_;
        throw std::invalid_argument("macro calls nested deeper than " +
                                    std::to_string(kMaxMacroDepth));
      }
      std::vector<std::unordered_map<std::string, Value>> caller_scopes;
      caller_scopes.swap(scopes_);
      struct Restore {
        Renderer& r;
        std::vector<std::unordered_map<std::string, Value>>& saved;
        ~Restore() {
          r.scopes_.swap(saved);
          --r.macro_depth_;
        }
      } restore{*this, caller_scopes};
      scopes_ = {caller_scopes.front()};
      scopes_.insert(scopes_.end(), closure->begin(), closure->end());
      scopes_.emplace_back();
      bind_macro_arguments(node, args, kwargs);
      std::string text;
      if (run(node.body, text) != Flow::kNormal) {
        throw std::invalid_argument("break or continue outside a loop in macro '" + name + "'");
      }
      return Value::string(std::move(text));
    });
  }

  // Positional arguments, then keyword ones, then defaults (evaluated in the macro's scope, as
  // Jinja does); a parameter left without any is undefined.
  void bind_macro_arguments(const Node& node, Args& args, Kwargs& kwargs) {
    auto& scope = scopes_.back();
    for (const auto& [key, value] : kwargs) {
      // Jinja's message also for a keyword naming a parameter given by position.
      const auto it = std::find(node.targets.begin() + 1, node.targets.end(), key);
      if (it == node.targets.end() ||
          static_cast<size_t>(it - node.targets.begin() - 1) < args.size()) {
        throw std::invalid_argument("macro '" + node.targets[0] + "' takes no keyword argument '" +
                                    key + "'");
      }
      scope[key] = value;
    }
    for (size_t i = 0; i + 1 < node.targets.size(); ++i) {
      const std::string& parameter = node.targets[i + 1];
      if (i < args.size()) {
        scopes_.back()[parameter] = args[i];
      } else if (!scopes_.back().contains(parameter)) {
        scopes_.back()[parameter] = node.defaults[i] ? eval(*node.defaults[i]) : Value();
      }
    }
  }

  void set(const Node& node) {
    Value value;
    if (node.expr) {
      value = eval(*node.expr);
    } else {
      std::string text;
      if (run(node.body, text) != Flow::kNormal) {
        impl_.fail(node.offset, "break or continue inside a {% set %} block");
      }
      value = Value::string(std::move(text));
    }
    if (node.targets.size() == 1) {
      scopes_.back()[node.targets[0]] = std::move(value);
      return;
    }
    Value ns = lookup(node.targets[0]);
    if (!ns.is_namespace) {
      impl_.fail(node.offset, "cannot assign attribute '" + node.targets[1] + "' of '" +
                                  node.targets[0] + "', which is not a namespace()");
    }
    for (auto& [key, existing] : *ns.dict) {
      if (key == node.targets[1]) {
        existing = std::move(value);
        return;
      }
    }
    ns.dict->emplace_back(node.targets[1], std::move(value));
  }

  List items_of(const Value& iterable, size_t offset) {
    switch (iterable.kind) {
      case Value::Kind::kList:
        return *iterable.list;
      case Value::Kind::kDict: {
        List keys;
        for (const auto& [k, v] : *iterable.dict) keys.push_back(Value::string(k));
        return keys;
      }
      case Value::Kind::kString: {
        List chars;
        for (size_t at = 0; at < iterable.s.size();) {
          const size_t length = decode_utf8(iterable.s, at).length;
          chars.push_back(Value::string(iterable.s.substr(at, length)));
          at += length;
        }
        return chars;
      }
      case Value::Kind::kUndefined:
        return {};  // Jinja iterates an undefined value as empty
      default:
        impl_.fail(offset, "'" + repr(iterable) + "' is not iterable");
    }
  }

  Flow run_for(const Node& node, std::string& out) {
    List items = items_of(eval(*node.expr), node.offset);
    scopes_.emplace_back();
    if (node.loop_filter) {
      List kept;
      for (Value& item : items) {
        bind(node, item);
        if (truthy(eval(*node.loop_filter))) kept.push_back(std::move(item));
      }
      items = std::move(kept);
    }
    const auto length = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < length; ++i) {
      bind(node, items[static_cast<size_t>(i)]);
      Dict loop = {{"index", Value::integer(i + 1)},
                   {"index0", Value::integer(i)},
                   {"revindex", Value::integer(length - i)},
                   {"revindex0", Value::integer(length - i - 1)},
                   {"first", Value::boolean(i == 0)},
                   {"last", Value::boolean(i + 1 == length)},
                   {"length", Value::integer(length)},
                   {"previtem", i > 0 ? items[static_cast<size_t>(i - 1)] : Value()},
                   {"nextitem", i + 1 < length ? items[static_cast<size_t>(i + 1)] : Value()}};
      scopes_.back()["loop"] = Value::of_dict(std::move(loop));
      if (run(node.body, out) == Flow::kBreak) break;
    }
    scopes_.pop_back();
    if (length == 0) return run(node.else_body, out);
    return Flow::kNormal;
  }

  void bind(const Node& node, const Value& item) {
    if (node.targets.size() == 1) {
      scopes_.back()[node.targets[0]] = item;
      return;
    }
    if (item.kind != Value::Kind::kList || item.list->size() != node.targets.size()) {
      impl_.fail(node.offset, "cannot unpack " + repr(item) + " into " +
                                  std::to_string(node.targets.size()) + " names");
    }
    for (size_t i = 0; i < node.targets.size(); ++i)
      scopes_.back()[node.targets[i]] = (*item.list)[i];
  }

  Value lookup(const std::string& name) const {
    for (auto scope = scopes_.rbegin(); scope != scopes_.rend(); ++scope) {
      if (const auto it = scope->find(name); it != scope->end()) return it->second;
    }
    return Value();
  }

  // Errors from builtins (std::invalid_argument) gain the template position here.
  Value eval(const Expr& e) {
    try {
      return eval_unchecked(e);
    } catch (const std::invalid_argument& error) {
      impl_.fail(e.offset, error.what());
    }
  }

  Value eval_unchecked(const Expr& e) {
    switch (e.kind) {
      case Expr::Kind::kLiteral:
        return e.literal;
      case Expr::Kind::kName:
        return lookup(e.name);
      case Expr::Kind::kList: {
        List list;
        for (const auto& item : e.args) list.push_back(eval(*item));
        return Value::of_list(std::move(list));
      }
      case Expr::Kind::kDict: {
        Dict dict;
        for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
          dict.emplace_back(str(eval(*e.args[i])), eval(*e.args[i + 1]));
        }
        return Value::of_dict(std::move(dict));
      }
      case Expr::Kind::kAttr:
        return attribute(eval(*e.args[0]), e.name, *e.args[0]);
      case Expr::Kind::kItem:
        return item(eval(*e.args[0]), eval(*e.args[1]), *e.args[0]);
      case Expr::Kind::kSlice:
        return slice(e);
      case Expr::Kind::kCall:
        return call(e);
      case Expr::Kind::kFilter:
        return filter(e);
      case Expr::Kind::kTest: {
        const bool result = test(e);
        return Value::boolean(e.negated ? !result : result);
      }
      case Expr::Kind::kNot:
        return Value::boolean(!truthy(eval(*e.args[0])));
      case Expr::Kind::kNeg: {
        const Value v = eval(*e.args[0]);
        if (v.kind == Value::Kind::kInt) return Value::integer(-v.i);
        if (v.kind == Value::Kind::kFloat) return Value::real(-v.f);
        throw std::invalid_argument("bad operand for unary -: " + repr(v));
      }
      case Expr::Kind::kAnd: {
        Value left = eval(*e.args[0]);
        return truthy(left) ? eval(*e.args[1]) : left;
      }
      case Expr::Kind::kOr: {
        Value left = eval(*e.args[0]);
        return truthy(left) ? left : eval(*e.args[1]);
      }
      case Expr::Kind::kCond:
        if (truthy(eval(*e.args[0]))) return eval(*e.args[1]);
        return e.args.size() > 2 ? eval(*e.args[2]) : Value();
      case Expr::Kind::kBinary:
        return binary(e.name, eval(*e.args[0]), eval(*e.args[1]), e.negated);
    }
    return Value();
  }

  static std::string describe(const Expr& e) {
    if (e.kind == Expr::Kind::kName) return "'" + e.name + "'";
    if (e.kind == Expr::Kind::kAttr) return describe(*e.args[0]) + "." + e.name;
    return "the value";
  }

  Value attribute(const Value& object, const std::string& name, const Expr& of) {
    if (object.undefined()) {
      throw std::invalid_argument(describe(of) + " is undefined (reading ." + name + ")");
    }
    if (object.kind == Value::Kind::kDict) {
      if (!object.is_namespace) {
        if (Value method = dict_method(object, name); !method.undefined()) return method;
      }
      if (const Value* v = object.find(name)) return *v;
      return Value();
    }
    if (object.kind == Value::Kind::kString) return string_method(object.s, name);
    return Value();
  }

  static int64_t normalize_index(int64_t index, size_t size) {
    return index < 0 ? index + static_cast<int64_t>(size) : index;
  }

  Value item(const Value& object, const Value& key, const Expr& of) {
    if (object.undefined()) throw std::invalid_argument(describe(of) + " is undefined");
    if (object.kind == Value::Kind::kDict) {
      if (const Value* v = object.find(str(key))) return *v;
      return Value();
    }
    if (object.kind == Value::Kind::kList && key.kind == Value::Kind::kInt) {
      const int64_t i = normalize_index(key.i, object.list->size());
      if (i < 0 || i >= static_cast<int64_t>(object.list->size())) return Value();
      return (*object.list)[static_cast<size_t>(i)];
    }
    if (object.kind == Value::Kind::kString && key.kind == Value::Kind::kInt) {
      const List chars = items_of(object, of.offset);
      const int64_t i = normalize_index(key.i, chars.size());
      if (i < 0 || i >= static_cast<int64_t>(chars.size())) return Value();
      return chars[static_cast<size_t>(i)];
    }
    if (key.kind == Value::Kind::kString) return attribute(object, key.s, of);
    return Value();
  }

  // Python's slice semantics, on lists and on the characters of strings.
  Value slice(const Expr& e) {
    const Value object = eval(*e.args[0]);
    const bool is_string = object.kind == Value::Kind::kString;
    if (!is_string && object.kind != Value::Kind::kList) {
      throw std::invalid_argument("cannot slice " + repr(object));
    }
    const List items = is_string ? items_of(object, e.offset) : *object.list;
    const auto n = static_cast<int64_t>(items.size());
    const auto part = [&](size_t i) -> std::optional<int64_t> {
      if (!e.args[i]) return std::nullopt;
      const Value v = eval(*e.args[i]);
      if (v.kind == Value::Kind::kNone) return std::nullopt;
      if (v.kind != Value::Kind::kInt)
        throw std::invalid_argument("slice indices must be integers");
      return v.i;
    };
    const int64_t step = part(3).value_or(1);
    if (step == 0) throw std::invalid_argument("slice step cannot be zero");
    const auto clamp = [&](std::optional<int64_t> v, int64_t fallback) {
      if (!v) return fallback;
      int64_t i = *v < 0 ? *v + n : *v;
      if (step > 0) return std::clamp<int64_t>(i, 0, n);
      return std::clamp<int64_t>(i, -1, n - 1);
    };
    const int64_t start = clamp(part(1), step > 0 ? 0 : n - 1);
    const int64_t stop = clamp(part(2), step > 0 ? n : -1);
    List out;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
      out.push_back(items[static_cast<size_t>(i)]);
    }
    if (!is_string) return Value::of_list(std::move(out));
    std::string text;
    for (const Value& c : out) text += c.s;
    return Value::string(std::move(text));
  }

  Value call(const Expr& e) {
    const Value callee = eval(*e.args[0]);
    if (callee.kind != Value::Kind::kFunction) {
      throw std::invalid_argument(describe(*e.args[0]) + " is not callable");
    }
    Args args;
    for (size_t i = 1; i < e.args.size(); ++i) args.push_back(eval(*e.args[i]));
    Kwargs kwargs;
    for (const auto& [name, value] : e.kwargs) kwargs.emplace_back(name, eval(*value));
    return (*callee.function)(args, kwargs);
  }

  static Value method(Function f) { return Value::of_function(std::move(f)); }

  // Python's str.strip/lstrip/rstrip: Unicode white space, or the characters of an argument.
  static std::string strip_chars(const std::string& s, const Args& args, bool left, bool right) {
    const std::string chars =
        !args.empty() && args[0].kind == Value::Kind::kString ? args[0].s : "";
    if (chars.empty()) {
      const std::string_view core = strip_white_space(s);
      if (core.empty()) return "";  // all white space, whichever side is stripped
      const size_t begin = left ? static_cast<size_t>(core.data() - s.data()) : 0;
      const size_t end =
          right ? static_cast<size_t>(core.data() - s.data()) + core.size() : s.size();
      return s.substr(begin, end - begin);
    }
    size_t begin = 0;
    size_t end = s.size();
    if (left) {
      while (begin < end && chars.find(s[begin]) != std::string::npos) ++begin;
    }
    if (right) {
      while (end > begin && chars.find(s[end - 1]) != std::string::npos) --end;
    }
    return s.substr(begin, end - begin);
  }

  // Python's str.upper()/lower(), per code point (simple case mapping).
  static std::string ascii_case(const std::string& s, bool upper) {
    std::string out;
    for (size_t at = 0; at < s.size();) {
      const Utf8Char c = decode_utf8(s, at);
      if (c.code_point == kInvalidCodePoint) {
        out += s[at];
      } else {
        const auto cp = static_cast<utf8proc_int32_t>(c.code_point);
        append_utf8(static_cast<uint32_t>(upper ? utf8proc_toupper(cp) : utf8proc_tolower(cp)),
                    out);
      }
      at += c.length;
    }
    return out;
  }

  // Python's str.title(): a letter after a non-letter starts a word (ASCII letters only here).
  static std::string title(const std::string& s) {
    std::string out = s;
    bool start = true;
    for (char& c : out) {
      const bool alpha = std::isalpha(static_cast<unsigned char>(c)) != 0;
      if (alpha) {
        c = static_cast<char>(start ? std::toupper(static_cast<unsigned char>(c))
                                    : std::tolower(static_cast<unsigned char>(c)));
      }
      start = !alpha;
    }
    return out;
  }

  // Jinja's title filter: words split at white space and -({[<, each capitalized.
  static std::string title_filter(const std::string& s) {
    std::string out;
    bool start = true;
    for (size_t at = 0; at < s.size();) {
      const Utf8Char c = decode_utf8(s, at);
      const std::string piece = s.substr(at, c.length);
      const bool boundary = is_white_space(c.code_point) ||
                            std::string_view("-({[<").find(piece) != std::string_view::npos;
      out += boundary ? piece : ascii_case(piece, start);
      start = boundary;
      at += c.length;
    }
    return out;
  }

  static std::string replace_all(const std::string& s, const std::string& from,
                                 const std::string& to) {
    if (from.empty()) return s;
    std::string out;
    size_t at = 0;
    for (size_t found; (found = s.find(from, at)) != std::string::npos; at = found + from.size()) {
      out += s.substr(at, found - at) + to;
    }
    return out + s.substr(at);
  }

  static bool affix(const std::string& s, const Value& arg, bool prefix) {
    const auto one = [&](const std::string& a) {
      return prefix ? std::string_view(s).starts_with(a) : std::string_view(s).ends_with(a);
    };
    if (arg.kind == Value::Kind::kList) {
      return std::any_of(arg.list->begin(), arg.list->end(),
                         [&](const Value& v) { return one(v.s); });
    }
    return one(str(arg));
  }

  static Value split(const std::string& s, const Args& args) {
    List parts;
    if (args.empty() || args[0].kind == Value::Kind::kNone) {
      size_t at = 0;
      while (true) {
        while (at < s.size() && is_space(s[at])) ++at;
        if (at >= s.size()) break;
        size_t end = at;
        while (end < s.size() && !is_space(s[end])) ++end;
        parts.push_back(Value::string(s.substr(at, end - at)));
        at = end;
      }
      return Value::of_list(std::move(parts));
    }
    const std::string sep = str(args[0]);
    if (sep.empty()) throw std::invalid_argument("split(): empty separator");
    int64_t limit = args.size() > 1 ? args[1].i : -1;
    size_t at = 0;
    for (size_t found; limit != 0 && (found = s.find(sep, at)) != std::string::npos; --limit) {
      parts.push_back(Value::string(s.substr(at, found - at)));
      at = found + sep.size();
    }
    parts.push_back(Value::string(s.substr(at)));
    return Value::of_list(std::move(parts));
  }

  Value string_method(const std::string& s, const std::string& name) {
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      const bool left = name != "rstrip";
      const bool right = name != "lstrip";
      return method([s, left, right](Args& a, Kwargs&) {
        return Value::string(strip_chars(s, a, left, right));
      });
    }
    if (name == "upper" || name == "lower") {
      const bool upper = name == "upper";
      return method([s, upper](Args&, Kwargs&) { return Value::string(ascii_case(s, upper)); });
    }
    if (name == "title") return method([s](Args&, Kwargs&) { return Value::string(title(s)); });
    if (name == "capitalize") {
      return method([s](Args&, Kwargs&) { return Value::string(capitalize(s)); });
    }
    if (name == "startswith" || name == "endswith") {
      const bool prefix = name == "startswith";
      return method([s, prefix](Args& a, Kwargs&) {
        if (a.empty()) throw std::invalid_argument("startswith/endswith need an argument");
        return Value::boolean(affix(s, a[0], prefix));
      });
    }
    if (name == "split") return method([s](Args& a, Kwargs&) { return split(s, a); });
    if (name == "replace") {
      return method([s](Args& a, Kwargs&) {
        if (a.size() < 2) throw std::invalid_argument("replace() needs two arguments");
        return Value::string(replace_all(s, str(a[0]), str(a[1])));
      });
    }
    if (name == "find") {
      return method([s](Args& a, Kwargs&) {
        const size_t at = a.empty() ? std::string::npos : s.find(str(a[0]));
        return Value::integer(at == std::string::npos ? -1 : static_cast<int64_t>(at));
      });
    }
    return Value();
  }

  static std::string capitalize(const std::string& s) {
    std::string out = ascii_case(s, false);
    if (!out.empty()) out[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(out[0])));
    return out;
  }

  static Value dict_method(const Value& object, const std::string& name) {
    const std::shared_ptr<Dict> dict = object.dict;
    if (name == "items") {
      return method([dict](Args&, Kwargs&) {
        List items;
        for (const auto& [k, v] : *dict) items.push_back(Value::of_list({Value::string(k), v}));
        return Value::of_list(std::move(items));
      });
    }
    if (name == "keys" || name == "values") {
      const bool keys = name == "keys";
      return method([dict, keys](Args&, Kwargs&) {
        List items;
        for (const auto& [k, v] : *dict) items.push_back(keys ? Value::string(k) : v);
        return Value::of_list(std::move(items));
      });
    }
    if (name == "get") {
      return method([dict](Args& a, Kwargs&) {
        if (a.empty()) throw std::invalid_argument("get() needs a key");
        for (const auto& [k, v] : *dict) {
          if (k == str(a[0])) return v;
        }
        return a.size() > 1 ? a[1] : Value::none();
      });
    }
    return Value();
  }

  Value binary(const std::string& op, const Value& a, const Value& b, bool negated) {
    if (op == "==") return Value::boolean(equal(a, b));
    if (op == "!=") return Value::boolean(!equal(a, b));
    if (op == "in") return Value::boolean(contains(b, a) != negated);
    if (op == "~") return Value::string(str(a) + str(b));
    if (op == "<" || op == "<=" || op == ">" || op == ">=") {
      int order;
      if (a.is_number() && b.is_number()) {
        order = a.number() < b.number() ? -1 : a.number() > b.number() ? 1 : 0;
      } else if (a.kind == Value::Kind::kString && b.kind == Value::Kind::kString) {
        order = a.s.compare(b.s);
      } else {
        throw std::invalid_argument("cannot compare " + repr(a) + " and " + repr(b));
      }
      if (op == "<") return Value::boolean(order < 0);
      if (op == "<=") return Value::boolean(order <= 0);
      if (op == ">") return Value::boolean(order > 0);
      return Value::boolean(order >= 0);
    }
    if (op == "+" && a.kind == Value::Kind::kString && b.kind == Value::Kind::kString) {
      return Value::string(a.s + b.s);
    }
    if (op == "+" && a.kind == Value::Kind::kList && b.kind == Value::Kind::kList) {
      List list = *a.list;
      list.insert(list.end(), b.list->begin(), b.list->end());
      return Value::of_list(std::move(list));
    }
    if (op == "*" && a.kind == Value::Kind::kString && b.kind == Value::Kind::kInt) {
      std::string out;
      for (int64_t i = 0; i < b.i; ++i) out += a.s;
      return Value::string(std::move(out));
    }
    if (!a.is_number() || !b.is_number()) {
      throw std::invalid_argument("unsupported operands for " + op + ": " + repr(a) + " and " +
                                  repr(b));
    }
    const bool ints = a.kind != Value::Kind::kFloat && b.kind != Value::Kind::kFloat;
    const double x = a.number();
    const double y = b.number();
    if ((op == "/" || op == "//" || op == "%") && y == 0) {
      throw std::invalid_argument("division by zero");
    }
    if (op == "/") return Value::real(x / y);
    if (ints) {
      const int64_t p = a.kind == Value::Kind::kBool ? a.b : a.i;
      const int64_t q = b.kind == Value::Kind::kBool ? b.b : b.i;
      if (op == "+") return Value::integer(p + q);
      if (op == "-") return Value::integer(p - q);
      if (op == "*") return Value::integer(p * q);
      if (op == "//") return Value::integer(static_cast<int64_t>(std::floor(x / y)));
      if (op == "%") return Value::integer(((p % q) + q) % q);
      if (op == "**") return Value::integer(static_cast<int64_t>(std::pow(x, y)));
    }
    if (op == "+") return Value::real(x + y);
    if (op == "-") return Value::real(x - y);
    if (op == "*") return Value::real(x * y);
    if (op == "//") return Value::real(std::floor(x / y));
    if (op == "%") return Value::real(x - y * std::floor(x / y));
    return Value::real(std::pow(x, y));
  }

  static bool contains(const Value& container, const Value& item) {
    switch (container.kind) {
      case Value::Kind::kString:
        return container.s.find(str(item)) != std::string::npos;
      case Value::Kind::kList:
        return std::any_of(container.list->begin(), container.list->end(),
                           [&](const Value& v) { return equal(v, item); });
      case Value::Kind::kDict:
        return container.find(str(item)) != nullptr;
      default:
        throw std::invalid_argument("argument of type " + repr(container) + " is not iterable");
    }
  }

  Value kwarg_or(const Kwargs& kwargs, const Args& args, size_t position, std::string_view name) {
    for (const auto& [k, v] : kwargs) {
      if (k == name) return v;
    }
    return position < args.size() ? args[position] : Value();
  }

  Value filter(const Expr& e) {
    Value value = eval(*e.args[0]);
    Args args;
    for (size_t i = 1; i < e.args.size(); ++i) args.push_back(eval(*e.args[i]));
    Kwargs kwargs;
    for (const auto& [name, arg] : e.kwargs) kwargs.emplace_back(name, eval(*arg));
    const std::string& f = e.name;
    if (f == "trim") return Value::string(strip_chars(str(value), {}, true, true));
    if (f == "length" || f == "count") {
      if (value.kind == Value::Kind::kString) {
        return Value::integer(static_cast<int64_t>(items_of(value, e.offset).size()));
      }
      if (value.kind == Value::Kind::kList)
        return Value::integer(static_cast<int64_t>(value.list->size()));
      if (value.kind == Value::Kind::kDict)
        return Value::integer(static_cast<int64_t>(value.dict->size()));
      if (value.undefined()) return Value::integer(0);
      throw std::invalid_argument("object of type " + repr(value) + " has no len()");
    }
    if (f == "tojson") {
      const Value indent = kwarg_or(kwargs, args, 0, "indent");
      std::string out;
      to_json(value,
              indent.kind == Value::Kind::kInt ? std::optional<int>(static_cast<int>(indent.i))
                                               : std::nullopt,
              0, truthy(kwarg_or(kwargs, {}, 9, "sort_keys")), out);
      return Value::string(std::move(out));
    }
    if (f == "upper" || f == "lower") return Value::string(ascii_case(str(value), f == "upper"));
    if (f == "title") return Value::string(title_filter(str(value)));
    if (f == "capitalize") return Value::string(capitalize(str(value)));
    if (f == "default" || f == "d") {
      const bool boolean = truthy(kwarg_or(kwargs, args, 1, "boolean"));
      if (value.undefined() || (boolean && !truthy(value))) {
        return args.empty() ? Value::string("") : args[0];
      }
      return value;
    }
    if (f == "first" || f == "last") {
      const List items = items_of(value, e.offset);
      if (items.empty()) return Value();
      return f == "first" ? items.front() : items.back();
    }
    if (f == "join") {
      const std::string sep = args.empty() ? "" : str(args[0]);
      std::string out;
      const List items = items_of(value, e.offset);
      for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + str(items[i]);
      return Value::string(std::move(out));
    }
    if (f == "list") return Value::of_list(items_of(value, e.offset));
    if (f == "string") return Value::string(str(value));
    if (f == "safe") return value;
    if (f == "int") {
      if (value.is_number()) return Value::integer(static_cast<int64_t>(value.number()));
      try {
        return Value::integer(std::stoll(str(value)));
      } catch (const std::exception&) {
        return Value::integer(0);
      }
    }
    if (f == "float") {
      if (value.is_number()) return Value::real(value.number());
      try {
        return Value::real(std::stod(str(value)));
      } catch (const std::exception&) {
        return Value::real(0);
      }
    }
    if (f == "reverse") {
      List items = items_of(value, e.offset);
      std::reverse(items.begin(), items.end());
      if (value.kind != Value::Kind::kString) return Value::of_list(std::move(items));
      std::string text;
      for (const Value& c : items) text += c.s;
      return Value::string(std::move(text));
    }
    if (f == "replace") {
      if (args.size() < 2) throw std::invalid_argument("replace needs two arguments");
      return Value::string(replace_all(str(value), str(args[0]), str(args[1])));
    }
    if (f == "items") {
      if (value.kind != Value::Kind::kDict) throw std::invalid_argument("items needs a mapping");
      return (*dict_method(value, "items").function)(args, kwargs);
    }
    if (f == "selectattr" || f == "rejectattr") return select(value, args, f == "selectattr", e);
    if (f == "map") {
      const Value attr = kwarg_or(kwargs, {}, 9, "attribute");
      if (attr.undefined()) throw std::invalid_argument("map is supported with attribute= only");
      List out;
      for (const Value& item : items_of(value, e.offset)) {
        out.push_back(item.kind == Value::Kind::kDict && item.find(str(attr))
                          ? *item.find(str(attr))
                          : Value());
      }
      return Value::of_list(std::move(out));
    }
    throw std::invalid_argument("unsupported filter '" + f + "'");
  }

  Value select(const Value& value, const Args& args, bool keep, const Expr& e) {
    if (args.empty()) throw std::invalid_argument("selectattr/rejectattr need an attribute");
    List out;
    for (const Value& item : items_of(value, e.offset)) {
      const Value* attr = item.kind == Value::Kind::kDict ? item.find(str(args[0])) : nullptr;
      const Value field = attr ? *attr : Value();
      bool passed = args.size() < 2
                        ? truthy(field)
                        : run_test(str(args[1]), field, Args(args.begin() + 2, args.end()));
      if (passed == keep) out.push_back(item);
    }
    return Value::of_list(std::move(out));
  }

  bool test(const Expr& e) {
    if (e.name == "defined" || e.name == "undefined") {
      // An undefined base object is still an error (as in Jinja), except for a plain name.
      const bool defined = !eval(*e.args[0]).undefined();
      return e.name == "defined" ? defined : !defined;
    }
    const Value value = eval(*e.args[0]);
    Args args;
    for (size_t i = 1; i < e.args.size(); ++i) args.push_back(eval(*e.args[i]));
    return run_test(e.name, value, args);
  }

  static bool run_test(const std::string& name, const Value& v, const Args& args) {
    using K = Value::Kind;
    if (name == "defined") return !v.undefined();
    if (name == "undefined") return v.undefined();
    if (name == "none") return v.kind == K::kNone;
    if (name == "string") return v.kind == K::kString;
    if (name == "number") return v.kind == K::kInt || v.kind == K::kFloat;
    if (name == "integer") return v.kind == K::kInt;
    if (name == "float") return v.kind == K::kFloat;
    if (name == "boolean") return v.kind == K::kBool;
    if (name == "true") return v.kind == K::kBool && v.b;
    if (name == "false") return v.kind == K::kBool && !v.b;
    if (name == "mapping") return v.kind == K::kDict;
    if (name == "sequence") return v.kind == K::kList || v.kind == K::kString || v.kind == K::kDict;
    if (name == "iterable") return v.kind == K::kList || v.kind == K::kString || v.kind == K::kDict;
    if (name == "callable") return v.kind == K::kFunction;
    if (name == "even" || name == "odd") {
      if (v.kind != K::kInt) throw std::invalid_argument("even/odd need an integer");
      return (v.i % 2 == 0) == (name == "even");
    }
    if (name == "divisibleby") {
      if (v.kind != K::kInt || args.empty() || args[0].kind != K::kInt || args[0].i == 0) {
        throw std::invalid_argument("divisibleby needs integers");
      }
      return v.i % args[0].i == 0;
    }
    if (name == "equalto" || name == "eq" || name == "==")
      return !args.empty() && equal(v, args[0]);
    if (name == "ne" || name == "!=") return args.empty() || !equal(v, args[0]);
    if (name == "in") return !args.empty() && contains(args[0], v);
    throw std::invalid_argument("unsupported test '" + name + "'");
  }

  static constexpr int kMaxMacroDepth = 64;
  static constexpr int64_t kMaxMacroCalls = 100000;

  const Template::Impl& impl_;
  std::vector<std::unordered_map<std::string, Value>> scopes_;
  int macro_depth_ = 0;
  int64_t macro_calls_ = 0;
};

}  // namespace

Template::Template(std::string_view source, std::string name) : impl_(std::make_unique<Impl>()) {
  impl_->name = std::move(name);
  impl_->source = std::string(source);
  const Impl& impl = *impl_;
  const std::function<void(size_t, const std::string&)> fail =
      [&impl](size_t offset, const std::string& what) { impl.fail(offset, what); };
  std::vector<Token> tokens = Lexer(impl_->source, fail).run();
  impl_->body = Parser(std::move(tokens), fail).parse();
}

Template::~Template() = default;
Template::Template(Template&&) noexcept = default;
Template& Template::operator=(Template&&) noexcept = default;

const std::string& Template::name() const { return impl_->name; }

std::string Template::render(const json& context) const {
  std::string out;
  Renderer(*impl_, context).render(impl_->body, out);
  return out;
}

}  // namespace lomo::jinja
