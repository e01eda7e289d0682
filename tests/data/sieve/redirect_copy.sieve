require "copy";
redirect :copy "alice@v.example";
redirect :copy "ALICE@v.example";
