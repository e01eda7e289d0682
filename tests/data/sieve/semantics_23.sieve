require "copy"; redirect :copy "a@v.example"; redirect "a@v.example";
