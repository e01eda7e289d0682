require "imap4flags"; if hasflag "x" { keep; }
