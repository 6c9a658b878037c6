#include "server/sqlite.h"

namespace lomo::server::sqlite {

namespace {

[[noreturn]] void fail(sqlite3* db, int code, const std::string& context) {
  const char* message = db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(code);
  throw Error("SQLite: " + context + ": " + message, code);
}

}  // namespace

Statement::~Statement() { sqlite3_finalize(statement_); }

Statement& Statement::bind(int index, int64_t value) {
  const int code = sqlite3_bind_int64(statement_, index, value);
  if (code != SQLITE_OK) fail(db_, code, "bind");
  return *this;
}

Statement& Statement::bind(int index, double value) {
  const int code = sqlite3_bind_double(statement_, index, value);
  if (code != SQLITE_OK) fail(db_, code, "bind");
  return *this;
}

Statement& Statement::bind(int index, std::string_view text) {
  const int code = sqlite3_bind_text64(statement_, index, text.data(), text.size(),
                                       SQLITE_TRANSIENT, SQLITE_UTF8);
  if (code != SQLITE_OK) fail(db_, code, "bind");
  return *this;
}

Statement& Statement::bind_blob(int index, std::string_view bytes) {
  // A zero-length blob from a null pointer would bind NULL; keep it an empty blob.
  static constexpr char kEmpty = 0;
  const int code = sqlite3_bind_blob64(statement_, index, bytes.empty() ? &kEmpty : bytes.data(),
                                       bytes.size(), SQLITE_TRANSIENT);
  if (code != SQLITE_OK) fail(db_, code, "bind");
  return *this;
}

Statement& Statement::bind_null(int index) {
  const int code = sqlite3_bind_null(statement_, index);
  if (code != SQLITE_OK) fail(db_, code, "bind");
  return *this;
}

bool Statement::step() {
  const int code = sqlite3_step(statement_);
  if (code == SQLITE_ROW) return true;
  if (code == SQLITE_DONE) return false;
  const std::string sql = sqlite3_sql(statement_);
  sqlite3_reset(statement_);
  fail(db_, code, sql.substr(0, 60));
}

void Statement::run() {
  while (step()) {
  }
}

void Statement::reset() {
  sqlite3_reset(statement_);
  sqlite3_clear_bindings(statement_);
}

int64_t Statement::column_int(int column) const { return sqlite3_column_int64(statement_, column); }

double Statement::column_double(int column) const {
  return sqlite3_column_double(statement_, column);
}

std::string Statement::column_text(int column) const {
  const auto* text = reinterpret_cast<const char*>(sqlite3_column_text(statement_, column));
  const int size = sqlite3_column_bytes(statement_, column);
  return text == nullptr ? std::string() : std::string(text, size);
}

std::string Statement::column_blob(int column) const {
  const auto* bytes = static_cast<const char*>(sqlite3_column_blob(statement_, column));
  const int size = sqlite3_column_bytes(statement_, column);
  return bytes == nullptr ? std::string() : std::string(bytes, size);
}

bool Statement::column_is_null(int column) const {
  return sqlite3_column_type(statement_, column) == SQLITE_NULL;
}

Connection::Connection(const std::filesystem::path& path, bool create) {
  const int flags = SQLITE_OPEN_READWRITE | (create ? SQLITE_OPEN_CREATE : 0) |
                    SQLITE_OPEN_NOMUTEX;  // each connection is used by one thread at a time
  const int code = sqlite3_open_v2(path.c_str(), &db_, flags, nullptr);
  if (code != SQLITE_OK) {
    const std::string message = db_ != nullptr ? sqlite3_errmsg(db_) : sqlite3_errstr(code);
    sqlite3_close(db_);
    db_ = nullptr;
    throw Error("SQLite: cannot open " + path.string() + ": " + message, code);
  }
  sqlite3_extended_result_codes(db_, 1);
  // Writers queue behind each other instead of failing with SQLITE_BUSY.
  sqlite3_busy_timeout(db_, 10000);
}

Connection::~Connection() {
  statements_.clear();
  sqlite3_close(db_);
}

StatementLease Connection::prepare(const std::string& sql) {
  auto it = statements_.find(sql);
  if (it == statements_.end()) {
    sqlite3_stmt* statement = nullptr;
    const int code = sqlite3_prepare_v3(db_, sql.c_str(), static_cast<int>(sql.size()),
                                        SQLITE_PREPARE_PERSISTENT, &statement, nullptr);
    if (code != SQLITE_OK) fail(db_, code, "prepare \"" + sql.substr(0, 60) + "\"");
    it = statements_.emplace(sql, std::make_unique<Statement>(db_, statement)).first;
  }
  it->second->reset();
  return StatementLease(*it->second);
}

void Connection::exec(const std::string& sql) {
  char* message = nullptr;
  const int code = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &message);
  if (code != SQLITE_OK) {
    const std::string text = message != nullptr ? message : sqlite3_errstr(code);
    sqlite3_free(message);
    throw Error("SQLite: " + sql.substr(0, 60) + ": " + text, code);
  }
}

int64_t Connection::changes() const { return sqlite3_changes64(db_); }

Transaction::Transaction(Connection& connection, Kind kind) : connection_(connection) {
  connection_.exec(kind == Kind::kWrite ? "BEGIN IMMEDIATE" : "BEGIN DEFERRED");
}

Transaction::~Transaction() {
  if (open_) {
    // A failed ROLLBACK (e.g. SQLite already rolled back after an I/O error) leaves nothing to do.
    sqlite3_exec(connection_.handle(), "ROLLBACK", nullptr, nullptr, nullptr);
  }
}

void Transaction::commit() {
  connection_.exec("COMMIT");
  open_ = false;
}

}  // namespace lomo::server::sqlite
