// Untrusted text on its way to a terminal or into a protobuf string (issue 12): control
// characters cannot forge rows or clear the screen, and bytes that are not UTF-8 cannot break a
// gRPC stream.
#include <gtest/gtest.h>

#include <string>

#include "client/render.h"
#include "common/printable.h"

namespace lomo {
namespace {

TEST(TerminalTextTest, ControlCharactersCannotMoveTheCursorOrStartARow) {
  EXPECT_EQ(printable_excerpt("job\n9999  forged  SUCCEEDED", 200),
            "job\\x0a9999  forged  SUCCEEDED");
  EXPECT_EQ(printable_excerpt("\x1b[2J\x1b[H\r", 200), "\\x1b[2J\\x1b[H\\x0d");
  // C1 controls in UTF-8 (U+009B is a one-character CSI on some terminals).
  EXPECT_EQ(printable_excerpt("a\xc2\x9b"
                              "2Jb",
                              200),
            "a\\u009b2Jb");
  EXPECT_EQ(printable_excerpt("caf\xc3\xa9 \xe2\x9c\x93", 200), "caf\xc3\xa9 \xe2\x9c\x93");
}

TEST(TerminalTextTest, BytesThatAreNotUtf8AreShownEscaped) {
  EXPECT_EQ(printable_excerpt("a\xff\xfe"
                              "b",
                              200),
            "a\\xff\\xfeb");
  EXPECT_EQ(printable_excerpt("\xc0\xaf", 200), "\\xc0\\xaf");           // overlong '/'
  EXPECT_EQ(printable_excerpt("\xed\xa0\x80", 200), "\\xed\\xa0\\x80");  // a surrogate
}

TEST(TerminalTextTest, ALogLineKeepsItsTabsOnly) {
  EXPECT_EQ(terminal_line("step\t10\tloss 2.5"), "step\t10\tloss 2.5");
  EXPECT_EQ(terminal_line("a\tb\x1b[2J\n"), "a\tb\\x1b[2J\\x0a");
}

TEST(TerminalTextTest, ValidUtf8ReplacesEachBadByteAndKeepsTheRest) {
  EXPECT_EQ(valid_utf8("loss 2.5 \xe2\x9c\x93"), "loss 2.5 \xe2\x9c\x93");
  EXPECT_EQ(valid_utf8("Error: \xff\xfe at byte 7"), "Error: \xef\xbf\xbd\xef\xbf\xbd at byte 7");
  EXPECT_EQ(valid_utf8("cut \xe2\x9c"), "cut \xef\xbf\xbd\xef\xbf\xbd");
  EXPECT_EQ(valid_utf8(std::string("nul\0ok", 6)), std::string("nul\0ok", 6));  // NUL is UTF-8
}

TEST(TerminalTextTest, AMultiLineReasonCannotForgeARowOfLomoctlGet) {
  // Every line after the first is indented under the "reason:" cell; none starts a row.
  EXPECT_EQ(client::terminal_paragraph("exited with code 1: boom\njob:    job-forged\x1b[2J", "  "),
            "exited with code 1: boom\n  job:    job-forged\\x1b[2J");
  EXPECT_EQ(client::terminal_text("name\r\nJOB-ID  NAME"), "name\\x0d\\x0aJOB-ID  NAME");
}

}  // namespace
}  // namespace lomo
