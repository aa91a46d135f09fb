// Cis2Native.cs: the cis2_client C library from C# through P/Invoke (any .NET, or Mono).
// Tested by the project with Debian's Mono (mcs + mono) against libcis2_client.so:
//   mcs -out:Cis2Native.exe Cis2Native.cs && LD_LIBRARY_PATH=<folder of the .so> mono Cis2Native.exe [ENDPOINT]
// On Windows, put cis2_client.dll beside the .exe. The Main below prints the state, signs in if nobody
// is, prints the user and the token's length (never the token) and waits for events; with
// CIS2_TEST_LOGOUT_CMD set it runs it and waits for signed_out (the project's test does that).
using System;
using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text;
using System.Threading;

public enum Cis2Result
{
    Ok = 0, NotSignedIn = 1, SignInFailed = 2, NotAllowed = 3, Locked = 4, Unreachable = 5,
    NoAgent = 6, BufferTooSmall = 7, BadArgument = 8, Protocol = 9,
}

public class Cis2Exception : Exception
{
    public readonly Cis2Result Code;
    public Cis2Exception(Cis2Result code, string message) : base(message) { Code = code; }
}

public sealed class Cis2Client : IDisposable
{
    const string Lib = "cis2_client";  // libcis2_client.so, cis2_client.dll

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    public delegate void EventCallback(IntPtr eventJson, IntPtr user);

    [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
    static extern IntPtr cis2_open(byte[] endpointUtf8);
    [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
    static extern void cis2_close(IntPtr c);
    [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
    static extern int cis2_status_json(IntPtr c, byte[] buf, UIntPtr cap, out UIntPtr used);
    [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
    static extern int cis2_whoami_json(IntPtr c, byte[] buf, UIntPtr cap, out UIntPtr used);
    [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
    static extern int cis2_get_token(IntPtr c, uint minValidSecs, byte[] buf, UIntPtr cap, out UIntPtr used);
    [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
    static extern int cis2_get_token_no_auth(IntPtr c, uint minValidSecs, byte[] buf, UIntPtr cap, out UIntPtr used);
    // CharSet.Unicode: without it char[] is marshalled as 8-bit ANSI, not UTF-16.
    [DllImport(Lib, CallingConvention = CallingConvention.Cdecl, CharSet = CharSet.Unicode)]
    static extern int cis2_whoami_json_w(IntPtr c, char[] buf, UIntPtr capUnits, out UIntPtr usedUnits);
    [DllImport(Lib, CallingConvention = CallingConvention.Cdecl, CharSet = CharSet.Unicode)]
    static extern int cis2_get_token_w(IntPtr c, uint minValidSecs, char[] buf, UIntPtr capUnits, out UIntPtr usedUnits);
    [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
    static extern int cis2_subscribe(IntPtr c, EventCallback onEvent, IntPtr user);
    [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
    static extern IntPtr cis2_last_error();

    delegate int Utf8Call(byte[] buf, UIntPtr cap, out UIntPtr used);
    delegate int Utf16Call(char[] buf, UIntPtr cap, out UIntPtr used);

    IntPtr handle;
    EventCallback keepAlive;  // the library holds a pointer to it: it must not be collected

    static string Utf8(IntPtr text)
    {
        if (text == IntPtr.Zero) return "";
        int n = 0;
        while (Marshal.ReadByte(text, n) != 0) n++;
        byte[] bytes = new byte[n];
        Marshal.Copy(text, bytes, 0, n);
        return Encoding.UTF8.GetString(bytes);
    }

    static string LastError() { return Utf8(cis2_last_error()); }

    public Cis2Client(string endpoint = null)
    {
        handle = cis2_open(endpoint == null ? null : Encoding.UTF8.GetBytes(endpoint + "\0"));
        if (handle == IntPtr.Zero) throw new Cis2Exception(Cis2Result.NoAgent, LastError());
    }

    // A 4 KiB buffer first; again with the size the library asks for when that is too small.
    static string Text(Utf8Call call)
    {
        byte[] buf = new byte[4096];
        while (true)
        {
            UIntPtr used;
            var rc = (Cis2Result)call(buf, (UIntPtr)buf.Length, out used);
            if (rc == Cis2Result.BufferTooSmall) { buf = new byte[(int)used]; continue; }
            if (rc != Cis2Result.Ok) throw new Cis2Exception(rc, LastError());
            return Encoding.UTF8.GetString(buf, 0, (int)used - 1);
        }
    }

    static string Wide(Utf16Call call)
    {
        char[] buf = new char[4096];
        while (true)
        {
            UIntPtr used;
            var rc = (Cis2Result)call(buf, (UIntPtr)buf.Length, out used);
            if (rc == Cis2Result.BufferTooSmall) { buf = new char[(int)used]; continue; }
            if (rc != Cis2Result.Ok) throw new Cis2Exception(rc, LastError());
            return new string(buf, 0, (int)used - 1);
        }
    }

    public string StatusJson() { return Text((byte[] b, UIntPtr c, out UIntPtr u) => cis2_status_json(handle, b, c, out u)); }
    public string WhoamiJson() { return Text((byte[] b, UIntPtr c, out UIntPtr u) => cis2_whoami_json(handle, b, c, out u)); }
    public string WhoamiJsonWide() { return Wide((char[] b, UIntPtr c, out UIntPtr u) => cis2_whoami_json_w(handle, b, c, out u)); }
    /// Signs in (the browser) if nobody is. Never log the token.
    public string GetToken(uint minValidSecs) { return Text((byte[] b, UIntPtr c, out UIntPtr u) => cis2_get_token(handle, minValidSecs, b, c, out u)); }
    public string GetTokenWide(uint minValidSecs) { return Wide((char[] b, UIntPtr c, out UIntPtr u) => cis2_get_token_w(handle, minValidSecs, b, c, out u)); }
    public string GetTokenNoAuth(uint minValidSecs) { return Text((byte[] b, UIntPtr c, out UIntPtr u) => cis2_get_token_no_auth(handle, minValidSecs, b, c, out u)); }

    /// onEvent gets each event's JSON, on the library's thread (marshal to your UI thread yourself).
    public void Subscribe(Action<string> onEvent)
    {
        keepAlive = (json, user) => onEvent(Utf8(json));
        var rc = (Cis2Result)cis2_subscribe(handle, keepAlive, IntPtr.Zero);
        if (rc != Cis2Result.Ok) throw new Cis2Exception(rc, LastError());
    }

    public void Dispose()
    {
        if (handle != IntPtr.Zero) { cis2_close(handle); handle = IntPtr.Zero; }
    }
}

public static class Program
{
    static string Field(string json, string name)
    {
        // Enough for a sample; use System.Text.Json or Newtonsoft in an EHR.
        string key = "\"" + name + "\":\"";
        int at = json.IndexOf(key);
        if (at < 0) return null;
        at += key.Length;
        return json.Substring(at, json.IndexOf('"', at) - at);
    }

    public static int Main(string[] args)
    {
        var seen = new System.Collections.Generic.List<string>();
        try
        {
            using (var agent = new Cis2Client(args.Length > 0 ? args[0] : null))
            {
                agent.Subscribe(json => { lock (seen) { seen.Add(Field(json, "type")); Monitor.PulseAll(seen); } });
                string status = agent.StatusJson();
                string sandbox = Field(status, "environment") == "sandbox" ? " (sandbox: NOT NHS CIS2)" : "";
                Console.WriteLine("state: " + Field(status, "state") + sandbox);
                string token = agent.GetToken(60);
                string who = agent.WhoamiJson();
                Console.WriteLine("user: " + Field(who, "uid"));
                Console.WriteLine("token: " + token.Length + " characters");
                if (agent.WhoamiJsonWide() == who && agent.GetTokenWide(60) == token)
                    Console.WriteLine("wide whoami matches");
                if (WaitFor(seen, "signed_in")) Console.WriteLine("event: signed_in");
                string logout = Environment.GetEnvironmentVariable("CIS2_TEST_LOGOUT_CMD");
                if (logout != null)
                {
                    var shell = Process.Start(new ProcessStartInfo("/bin/sh", "-c \"" + logout.Replace("\"", "\\\"") + "\"") { UseShellExecute = false });
                    shell.WaitForExit();
                    if (WaitFor(seen, "signed_out")) Console.WriteLine("event: signed_out");
                    try { agent.GetTokenNoAuth(0); }
                    catch (Cis2Exception e) { Console.WriteLine("after sign-out: " + e.Code); }
                }
            }
        }
        catch (Cis2Exception e)
        {
            Console.Error.WriteLine("cis2_client: " + e.Message + " (" + e.Code + ")");
            return 1;
        }
        return 0;
    }

    static bool WaitFor(System.Collections.Generic.List<string> seen, string type)
    {
        var until = DateTime.UtcNow.AddSeconds(60);
        lock (seen)
        {
            while (!seen.Contains(type))
            {
                var left = until - DateTime.UtcNow;
                if (left <= TimeSpan.Zero) return false;
                Monitor.Wait(seen, left);
            }
        }
        return true;
    }
}
